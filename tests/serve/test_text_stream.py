"""Incremental detokenisation (moge.serve.runner.TextStream): the text sent token by token equals the
text of all the tokens, cut before the first stop string; a partial UTF-8 character or the start of
a stop string is never sent early."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from inference.test_tokenizer import train_sentencepiece

from moge.inference.tokenizer import load_tokenizer
from moge.serve.runner import REPLACEMENT, TextStream


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model"))


def _reference(tok, ids, stops):
    """The whole text, cut before the earliest stop string, and how many ids it took to see that."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)], n
    return tok.decode(ids), len(ids)


def _stream(tok, ids, stops):
    stream, deltas, used = TextStream(tok, stops), [], 0
    for i, t in enumerate(ids):
        deltas.append(stream.push([t], final=i == len(ids) - 1))
        used = i + 1
        if stream.stopped:
            break
    return stream, deltas, used


def test_bytes_of_one_character_are_held_until_complete(tok):
    ids = tok.encode("专家 🙂 ok")
    assert REPLACEMENT in tok.decode(ids[:4])  # the emoji arrives as byte-fallback pieces
    stream, deltas, _ = _stream(tok, ids, [])
    assert "".join(deltas) == "专家 🙂 ok" == stream.text
    assert all(REPLACEMENT not in d for d in deltas)
    assert "🙂" in deltas  # sent whole, by the token that completed it


def test_a_stop_string_across_tokens_is_cut_and_never_leaked(tok):
    ids = tok.encode("experts route every token")
    stream, deltas, used = _stream(tok, ids, ["route"])
    assert stream.stopped and stream.text == "experts "
    assert "".join(deltas) == "experts "
    assert tok.decode(ids[:used]).find("route") >= 0 > tok.decode(ids[:used - 1]).find("route")


def test_the_stop_token_is_stripped_from_the_text(tok):
    ids = tok.encode("hello") + [tok.turn_end_id]
    stream = TextStream(tok)
    stream.push(ids[:-1])
    stream.push(ids[-1:], final=True, strip_last=True)
    assert stream.text == "hello"


def test_no_tokenizer_gives_no_text():
    stream = TextStream(None)
    assert stream.push([5, 6], final=True) == "" and stream.ids == [5, 6]


@given(st.lists(st.integers(3, 319), min_size=1, max_size=24),
       st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz 专家🙂", min_size=1, max_size=4), max_size=3),
       st.data())
def test_streamed_text_equals_the_cut_reference(tok, ids, stops, data):
    if data.draw(st.booleans()):  # a stop string that does occur in the text, to exercise the cut
        text = tok.decode(ids)
        if len(text) > 2:
            a = data.draw(st.integers(0, len(text) - 2))
            stops = stops + [text[a:a + data.draw(st.integers(1, 3))]]
    stream, deltas, used = _stream(tok, ids, stops)
    expected, needed = _reference(tok, ids, stops)
    assert "".join(deltas) == stream.text == expected
    assert used == needed
    assert stream.stopped == any(s in tok.decode(ids[:used]) for s in stops)
    for d in deltas[:-1]:  # before the end nothing is sent that a later token could still change
        assert not d.endswith(REPLACEMENT)
