"""`moge data prepare` end to end on the generated sample: manifest, caching, checksums, errors, CLI."""

import argparse
import hashlib
import json
import time

import numpy as np
import pytest
from data_sample import VOCAB, FakeRegistry, make_archive

from moge.data import cli, fetch, sources
from moge.data.fetch import Archive, ChecksumError, DownloadError, ensure_archive, index_links
from moge.data.prepare import prepare
from moge.data.shards import TokenShards


def _prepare(tmp_path, sample_sources, registry=None, **kw):
    srcs, files = sample_sources
    registry = registry or FakeRegistry(files)
    return prepare(tmp_path / "out", cache_dir=tmp_path / "cache", sources=srcs, vocab_size=VOCAB,
                   val_fraction=0.2, download=registry, **kw), registry


def test_manifest_records_sizes_hashes_and_versions(prepared):
    out, m = prepared
    assert m["cached"] is False
    assert list(m["domains"]) == ["verse", "prose", "code_docs"]
    for info in m["domains"].values():
        assert info["documents"]["train"] > 0 and info["documents"]["val"] > 0
        assert info["tokens"]["train"] > info["tokens"]["val"] > 0
        assert len(info["text_sha256"]) == 64
    assert m["domains"]["verse"]["source"]["sha256"] == hashlib.sha256(make_archive("verse")).hexdigest()
    assert m["domains"]["prose"]["source"]["python"]  # generated sources record the interpreter
    assert m["tokenizer"]["eos_id"] == 0 and m["tokenizer"]["pad_id"] == 1
    assert m["tokenizer"]["vocab_size"] <= VOCAB == m["tokenizer"]["vocab_size_requested"]
    assert {"python", "numpy", "tokenizers"} <= set(m["tools"])
    assert set(m["outputs"]) == {"tokenizer.json", "tokenizer_config.json"} | {
        f"{s}/{d}.npy" for s in ("train", "val") for d in m["domains"]}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["outputs"] == m["outputs"] and "cached" not in on_disk


def test_second_run_is_instant_and_downloads_nothing(tmp_path, sample_sources):
    first, registry = _prepare(tmp_path, sample_sources)
    assert registry.calls == ["sample-1.0.tar.gz"]
    t = time.perf_counter()
    second, _ = _prepare(tmp_path, sample_sources, registry)
    assert time.perf_counter() - t < 1.0
    assert second["cached"] is True and registry.calls == ["sample-1.0.tar.gz"]
    assert second["outputs"] == first["outputs"]
    # a rebuild from the cached archive is byte-identical: the pipeline is deterministic
    third, _ = _prepare(tmp_path, sample_sources, registry, force=True)
    assert third["cached"] is False and third["outputs"] == first["outputs"]
    assert registry.calls == ["sample-1.0.tar.gz"]


def test_corrupted_output_is_detected_and_rebuilt(tmp_path, sample_sources):
    first, _ = _prepare(tmp_path, sample_sources)
    shard = tmp_path / "out" / "train" / "prose.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"train/prose.npy has sha256 [0-9a-f]{64}, expected"):
        TokenShards(tmp_path / "out", verify=True)
    logs = []
    again, _ = _prepare(tmp_path, sample_sources, log=logs.append)
    assert again["cached"] is False and any("do not match the manifest" in line for line in logs)
    assert again["outputs"] == first["outputs"]
    TokenShards(tmp_path / "out", verify=True)


def test_changed_settings_rebuild_and_remove_stale_files(tmp_path, sample_sources):
    _prepare(tmp_path, sample_sources)
    logs = []
    srcs, files = sample_sources
    m = prepare(tmp_path / "out", cache_dir=tmp_path / "cache", sources=srcs[:2], vocab_size=300,
                val_fraction=0.2, download=FakeRegistry(files), log=logs.append)
    assert m["cached"] is False and any("settings or sources changed (sources, vocab_size)" in x for x in logs)
    assert not (tmp_path / "out" / "train" / "code_docs.npy").exists()
    assert list(TokenShards(tmp_path / "out", verify=True).domains) == ["verse", "prose"]


def test_corrupted_cached_archive_names_file_and_hashes(tmp_path, sample_sources):
    _prepare(tmp_path, sample_sources)
    cached = tmp_path / "cache" / "downloads" / "sample-1.0.tar.gz"
    cached.write_bytes(cached.read_bytes()[:-10])
    expected = sample_sources[0][0].archive.sha256
    with pytest.raises(ChecksumError) as e:
        _prepare(tmp_path, sample_sources, force=True)
    msg = str(e.value)
    assert str(cached) in msg and f"expected {expected}" in msg
    assert f"found {hashlib.sha256(cached.read_bytes()).hexdigest()}" in msg


def test_tampered_download_is_not_cached(tmp_path, sample_sources):
    srcs, files = sample_sources
    bad = FakeRegistry({name: data + b"x" for name, data in files.items()})
    with pytest.raises(ChecksumError, match="sample-1.0.tar.gz .*sha256 mismatch: expected .*nothing was cached"):
        _prepare(tmp_path, sample_sources, bad)
    assert not (tmp_path / "cache" / "downloads" / "sample-1.0.tar.gz").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_download_from_a_local_simple_index(tmp_path):
    """The real download code against a PEP 503 index laid out on disk, as pip reads one."""
    data = make_archive("verse", 2)
    archive = Archive("My_Pkg", "1.0", "my_pkg-1.0.tar.gz", hashlib.sha256(data).hexdigest())
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / archive.filename).write_bytes(data)
    page = tmp_path / "simple" / "my-pkg"
    page.mkdir(parents=True)
    page.joinpath("index.html").write_text(
        f'<html><body><a href="../../files/{archive.filename}#sha256={archive.sha256}">{archive.filename}</a>'
        f'<a href="../../files/other.tar.gz">other.tar.gz</a></body></html>')
    index = (tmp_path / "simple").as_uri()
    path = ensure_archive(archive, tmp_path / "cache", index_url=index)
    assert path.read_bytes() == data and path.parent == tmp_path / "cache" / "downloads"
    missing = Archive("my-pkg", "2.0", "my_pkg-2.0.tar.gz", "0" * 64)
    with pytest.raises(DownloadError, match="does not list my_pkg-2.0.tar.gz"):
        ensure_archive(missing, tmp_path / "cache", index_url=index)
    with pytest.raises(DownloadError, match="cannot read the index page"):
        ensure_archive(missing, tmp_path / "cache", index_url=(tmp_path / "nowhere").as_uri())


def test_index_links_json_and_html():
    body = json.dumps({"files": [{"filename": "a-1.tar.gz", "url": "https://x/a-1.tar.gz", "hashes": {}}]})
    assert index_links(body.encode(), "application/vnd.pypi.simple.v1+json") == {"a-1.tar.gz": "https://x/a-1.tar.gz"}
    assert index_links(b'<a href="f/b-2.zip">b-2.zip</a>', "text/html") == {"b-2.zip": "f/b-2.zip"}
    with pytest.raises(DownloadError, match="malformed JSON index page"):
        index_links(b"[1]", "application/vnd.pypi.simple.v1+json")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "c"))
    assert fetch.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert fetch.default_cache_dir().parts[-2:] == (".cache", "moge")


@pytest.mark.parametrize("kw, message", [
    (dict(vocab_size=100), r"vocab_size=100 is invalid"),
    (dict(val_fraction=1.5), r"val_fraction=1.5 is invalid"),
    (dict(seed=-1), r"seed=-1 is invalid"),
    (dict(min_frequency=0), r"min_frequency=0 is invalid"),
    (dict(domains=["klingon"]), r"unknown domain 'klingon': valid domains are shakespeare, bible, python_docs"),
])
def test_bad_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        prepare(tmp_path / "out", cache_dir=tmp_path / "cache", **kw)


def test_sources_must_label_their_documents(tmp_path, sample_sources):
    from data_sample import make_documents

    wrong = sources.Source("prose", "x", "x", lambda _p: make_documents("verse"))
    with pytest.raises(ValueError, match="source 'prose' produced document 'verse_00' labelled 'verse'"):
        prepare(tmp_path / "out", cache_dir=tmp_path / "cache", sources=[wrong], vocab_size=VOCAB)
    empty = sources.Source("prose", "x", "x", lambda _p: [])
    with pytest.raises(ValueError, match="source 'prose' produced no documents"):
        prepare(tmp_path / "out", cache_dir=tmp_path / "cache", sources=[empty], vocab_size=VOCAB)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="moge")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepare_and_info(tmp_path, sample_sources, monkeypatch, capsys):
    srcs, files = sample_sources
    monkeypatch.setattr(sources, "SOURCES", {s.domain: s for s in srcs})
    cache = tmp_path / "cache" / "downloads"
    cache.mkdir(parents=True)
    for name, data in files.items():  # pre-seeded cache: the CLI never reaches for the network
        (cache / name).write_bytes(data)
    out = str(tmp_path / "out")
    common = ["--out", out, "--cache-dir", str(tmp_path / "cache"), "--vocab-size", str(VOCAB), "--quiet"]
    assert _cli(["data", "prepare", *common, "--domains", "verse,prose", "--val-fraction", "0.25", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["domains"]) == ["verse", "prose"] and "documents" not in summary
    assert summary["cached"] is False and summary["config"]["val_fraction"] == 0.25
    assert _cli(["data", "prepare", *common, "--domains", "verse,prose", "--val-fraction", "0.25"]) == 0
    table = capsys.readouterr().out
    assert "up to date" in table and "verse" in table and "total" in table
    assert _cli(["data", "info", "--out", out, "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is True and info["totals"] == summary["totals"]
    assert _cli(["data", "info", "--out", out]) == 0
    assert "tokens train/val" in capsys.readouterr().out


def test_cli_reports_download_failure(tmp_path, monkeypatch, capsys):
    archive = Archive("nothing", "1.0", "nothing-1.0.tar.gz", "0" * 64)
    src = sources.Source("prose", "x", "x", lambda _p: [], archive)
    monkeypatch.setattr(sources, "SOURCES", {"prose": src})
    rc = _cli(["data", "prepare", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
               "--index-url", (tmp_path / "no-index").as_uri(), "--quiet"])
    assert rc == 1 and "moge data prepare: error: cannot read the index page" in capsys.readouterr().err


def test_reader_matches_numpy_view_of_files(prepared):
    out, m = prepared
    for rel in m["outputs"]:
        if rel.endswith(".npy"):
            arr = np.load(out / rel)
            assert arr.dtype == np.uint16 and arr.max() < m["tokenizer"]["vocab_size"]


def test_missing_output_files_are_reported_and_rebuilt(tmp_path, sample_sources):
    _prepare(tmp_path, sample_sources)
    (tmp_path / "out" / "val" / "verse.npy").unlink()
    shards = TokenShards(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"val/verse.npy does not exist \(run `moge data prepare` again\)"):
        shards.tokens("val", "verse")
    with pytest.raises(ChecksumError, match="val/verse.npy is missing"):
        shards.verify()
    assert _prepare(tmp_path, sample_sources)[0]["cached"] is False
    assert (tmp_path / "out" / "val" / "verse.npy").is_file()
