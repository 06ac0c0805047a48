"""The byte-level BPE tokenizer: exact round trips, special tokens, settings, clear errors."""

import json

import numpy as np
import pytest
from data_sample import VOCAB, make_documents
from hypothesis import given
from hypothesis import strategies as st

from moge.data import bpe
from moge.inference.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for domain in ("verse", "prose", "code_docs") for d in make_documents(domain)]
    return bpe.train_bpe(texts, VOCAB)


ROUND_TRIP = [
    "",
    "plain words",
    " leading space, trailing space ",
    "tabs\tand\t\ttabs\n\nblank lines\r\nCRLF\rCR",
    "    indented\n        more",
    "unicode: café naïve Zürich — “quotes” 日本語 한국어 Ελληνικά 🙂👍🏽 \u200b",
    "combining: e\u0301 vs \u00e9",  # no normalizer: the two spellings stay distinct
    "literal special tokens <|endoftext|> and <|pad|> inside text",
    "\x00\x01 control \x7f bytes",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(tok, text):
    ids = bpe.encode_texts(tok, [text])[0]
    assert ids.dtype == np.uint16
    assert bpe.decode_ids(tok, ids) == text


@given(st.text(max_size=200))
def test_round_trip_any_text(tok, text):
    assert bpe.decode_ids(tok, bpe.encode_texts(tok, [text])[0]) == text


def test_no_normalizer_and_byte_level_settings(tok):
    cfg = json.loads(tok.to_str())
    assert cfg["normalizer"] is None
    assert cfg["pre_tokenizer"]["type"] == "ByteLevel" and cfg["pre_tokenizer"]["add_prefix_space"] is False
    assert cfg["decoder"]["type"] == "ByteLevel"
    assert tok.get_vocab_size() <= VOCAB


def test_special_token_ids_and_no_injected_eos(tok):
    assert [tok.token_to_id(t) for t in bpe.SPECIAL_TOKENS] == [0, 1]
    ids = bpe.encode_texts(tok, ["a <|endoftext|> b"])[0]
    assert 0 not in ids.tolist()  # text can never end a document early
    assert tok.encode("<|endoftext|>", add_special_tokens=False).ids == [0]  # but the token itself exists


def test_merges_compress_text(tok):
    text = make_documents("verse")[0].text
    assert len(bpe.encode_texts(tok, [text])[0]) < 0.6 * len(text.encode())


def test_training_is_deterministic():
    texts = [d.text for d in make_documents("prose")]
    assert bpe.train_bpe(texts, 300).to_str() == bpe.train_bpe(texts, 300).to_str()


def test_saved_tokenizer_loads_in_moge_tokenizer(tok, tmp_path):
    bpe.save_tokenizer(tok, tmp_path)
    again = bpe.load_bpe(tmp_path)
    assert again.to_str() == tok.to_str()
    generic = load_tokenizer(tmp_path)
    assert generic.eos_id == 0 and generic.pad_id == 1 and generic.bos_id is None
    text = "Hello,  wörld!\n"
    assert generic.decode(generic.encode(text)) == text


@pytest.mark.parametrize("size", [0, 100, bpe.MIN_VOCAB_SIZE - 1, bpe.MAX_VOCAB_SIZE + 1, 8192.0, True, "8192"])
def test_bad_vocab_size(size):
    with pytest.raises(ValueError, match=r"vocab_size=.* is invalid: must be an integer from 258"):
        bpe.train_bpe(["some text"], size)


def test_minimum_vocab_is_bytes_plus_specials():
    tok = bpe.train_bpe(["abc abc"], bpe.MIN_VOCAB_SIZE)
    assert tok.get_vocab_size() == bpe.MIN_VOCAB_SIZE
    assert bpe.decode_ids(tok, bpe.encode_texts(tok, ["ü abc"])[0]) == "ü abc"


def test_load_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json does not exist"):
        bpe.load_bpe(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        bpe.load_bpe(tmp_path / "tokenizer.json")
