"""A corpus is used with a checkpoint only when both speak the same tokenizer."""

import json
import shutil

import pytest

from moge.data.tokenizer_check import check_corpus_tokenizer, checkpoint_tokenizer
from moge.errors import ConfigError


@pytest.fixture
def corpus(prepared):
    return prepared[0]


def _checkpoint(tmp_path, name="ckpt"):
    ckpt = tmp_path / name
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return ckpt


def test_the_corpus_own_tokenizer_matches(corpus, tmp_path):
    ckpt = _checkpoint(tmp_path)
    shutil.copy2(corpus / "tokenizer.json", ckpt / "tokenizer.json")  # what `moge train` does
    check_corpus_tokenizer(corpus, ckpt)
    # the same tokenizer re-saved with other formatting is the same tokenizer
    data = json.loads((corpus / "tokenizer.json").read_text())
    (ckpt / "tokenizer.json").write_text(json.dumps(data, indent=4, sort_keys=True))
    check_corpus_tokenizer(corpus, ckpt)


def test_a_checkpoint_without_a_tokenizer_has_nothing_to_compare(corpus, tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert checkpoint_tokenizer(ckpt) is None
    check_corpus_tokenizer(corpus, ckpt)


def test_another_tokenizer_json_is_refused_naming_both(corpus, tmp_path):
    ckpt = _checkpoint(tmp_path)
    data = json.loads((corpus / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, other meaning
    (ckpt / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        check_corpus_tokenizer(corpus, ckpt)
    message = str(e.value)
    assert str(corpus / "tokenizer.json") in message and str(ckpt / "tokenizer.json") in message
    assert "another tokenizer" in message


def test_a_sentencepiece_checkpoint_is_refused(corpus, tmp_path):
    ckpt = _checkpoint(tmp_path)
    shutil.copy2(corpus / "tokenizer.json", ckpt / "tokenizer.json")
    (ckpt / "tokenizer.model").write_bytes(b"\x0a\x05hello")  # read first, as the model loader does
    assert checkpoint_tokenizer(ckpt) == ckpt / "tokenizer.model"
    with pytest.raises(ConfigError, match=r"tokenizer\.model"):
        check_corpus_tokenizer(corpus, ckpt)
