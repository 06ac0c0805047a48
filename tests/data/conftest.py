"""Fixtures for the data tests: the generated sample's sources and one corpus prepared from it."""

import hashlib

import pytest
from data_sample import VOCAB, FakeRegistry, make_archive, make_documents, read_archive_docs

from moge.data.fetch import Archive
from moge.data.prepare import prepare
from moge.data.sources import Source


@pytest.fixture(scope="session")
def sample_sources():
    """(sources, registry): 'verse' from a generated archive, 'prose' and 'code_docs' generated directly."""
    data = make_archive("verse")
    archive = Archive("sample", "1.0", "sample-1.0.tar.gz", hashlib.sha256(data).hexdigest())
    sources = [
        Source("verse", "generated verse", "generated for tests", read_archive_docs("verse"), archive),
        Source("prose", "generated prose", "generated for tests", lambda _p: make_documents("prose")),
        Source("code_docs", "generated docs", "generated for tests", lambda _p: make_documents("code_docs", 10)),
    ]
    return sources, {archive.filename: data}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, sample_sources):
    """A corpus prepared once from the sample (tests that modify files copy it first)."""
    sources, files = sample_sources
    root = tmp_path_factory.mktemp("prepared")
    manifest = prepare(root / "out", cache_dir=root / "cache", sources=sources, vocab_size=VOCAB,
                       val_fraction=0.2, download=FakeRegistry(files))
    return root / "out", manifest
