"""Token shards and their readers: round trips, a deterministic resumable sampler, validation windows."""

import json

import numpy as np
import pytest
from data_sample import make_documents

from moge.data import bpe
from moge.data.shards import TokenShards, TrainSampler, concat_documents, read_shard, write_shard


def test_shard_write_read_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1 << 16, size=1000, dtype=np.uint16)
    write_shard(tmp_path / "a" / "x.npy", ids)
    back = read_shard(tmp_path / "a" / "x.npy")
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    np.testing.assert_array_equal(back, ids)
    write_shard(tmp_path / "empty.npy", np.zeros(0, dtype=np.uint16))
    assert len(read_shard(tmp_path / "empty.npy")) == 0


def test_shard_rejects_wrong_arrays(tmp_path):
    with pytest.raises(ValueError, match="1-D uint16"):
        write_shard(tmp_path / "x.npy", np.zeros(3, dtype=np.int64))
    np.save(tmp_path / "y.npy", np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match="expected 1-D uint16"):
        read_shard(tmp_path / "y.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_shard(tmp_path / "missing.npy")


def test_concat_documents_offsets():
    docs = [np.array([5, 6], np.uint16), np.array([], np.uint16), np.array([7], np.uint16)]
    ids, offsets = concat_documents(docs, eos_id=0)
    assert ids.tolist() == [5, 6, 0, 0, 7, 0] and offsets == [0, 3, 4]


def test_shards_decode_back_to_the_documents(prepared):
    out, manifest = prepared
    shards = TokenShards(out, verify=True)
    tok = bpe.load_bpe(shards.tokenizer_path)
    originals = {d.name: d.text for n, c in (("verse", 8), ("prose", 8), ("code_docs", 10))
                 for d in make_documents(n, c)}
    for rec in shards.documents():
        ids = shards.tokens(rec["split"], rec["domain"])
        assert ids[rec["offset"] + rec["tokens"]] == shards.eos_id
        text = bpe.decode_ids(tok, ids[rec["offset"]:rec["offset"] + rec["tokens"]])
        assert text == originals[rec["name"]] and len(text) == rec["chars"]
    assert len(shards.documents(split="val")) + len(shards.documents(split="train")) == len(shards.documents())


def test_validation_documents_are_not_in_training(prepared):
    out, _ = prepared
    shards = TokenShards(out)
    for domain in shards.domains:
        train = {d["name"] for d in shards.documents(domain, "train")}
        val = {d["name"] for d in shards.documents(domain, "val")}
        assert train and val and not train & val
        assert len(shards.tokens("val", domain)) == shards.num_tokens("val", domain)


def test_sampler_is_deterministic_and_windows_come_from_the_shards(prepared):
    shards = TokenShards(prepared[0])
    a = TrainSampler(shards, batch_size=8, seq_len=32, seed=7)
    b = TrainSampler(shards, batch_size=8, seq_len=32, seed=7)
    for step in (0, 1, 5, 1000):
        x, y = a.batch(step), b.batch(step)
        np.testing.assert_array_equal(x.tokens, y.tokens)
        assert x.tokens.shape == (8, 33) and x.tokens.dtype == np.int64
        for row, d, s in zip(x.tokens, x.domains, x.starts):
            np.testing.assert_array_equal(row, shards.tokens("train", shards.domains[d])[s:s + 33])
    assert not np.array_equal(a.batch(0).tokens, a.batch(1).tokens)
    assert not np.array_equal(a.batch(0).tokens, a.batch(0, micro=1).tokens)
    np.testing.assert_array_equal(a.batch(4, 2).tokens, b.batch(4, micro=2).tokens)
    assert not np.array_equal(a.batch(0).tokens, TrainSampler(shards, batch_size=8, seq_len=32, seed=8).batch(0).tokens)


def test_sampler_resumes_exactly_from_state(prepared):
    shards = TokenShards(prepared[0])
    straight = TrainSampler(shards, batch_size=4, seq_len=16, seed=3)
    run = [next(straight) for _ in range(10)]
    first = TrainSampler(shards, batch_size=4, seq_len=16, seed=3)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = TrainSampler(shards, **state)
    assert resumed.step == 6
    for expected, got in zip(run[6:], (next(resumed) for _ in range(4))):
        np.testing.assert_array_equal(expected.tokens, got.tokens)
        np.testing.assert_array_equal(expected.domains, got.domains)


def test_sampler_domain_weights(prepared):
    shards = TokenShards(prepared[0])
    sizes = np.array([shards.num_tokens("train", d) for d in shards.domains], float)
    sampler = TrainSampler(shards, batch_size=64, seq_len=8, seed=0)
    counts = np.bincount(np.concatenate([sampler.batch(s).domains for s in range(50)]), minlength=len(sizes))
    np.testing.assert_allclose(counts / counts.sum(), sizes / sizes.sum(), atol=0.05)
    only = TrainSampler(shards, batch_size=32, seq_len=8, weights={"prose": 1.0})
    assert {shards.domains[d] for d in only.batch(0).domains} == {"prose"}


def test_validation_windows_walk_each_shard(prepared):
    shards = TokenShards(prepared[0])
    for domain in shards.domains:
        ids = shards.tokens("val", domain)
        n = shards.num_val_windows(domain, 16)
        assert n == (len(ids) - 1) // 16 > 0
        rows = np.concatenate(list(shards.val_batches(domain, seq_len=16, batch_size=5)))
        assert rows.shape == (n, 17)
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(row, ids[16 * i:16 * i + 17])
        capped = list(shards.val_batches(domain, seq_len=16, batch_size=2, max_windows=3))
        assert [len(b) for b in capped] == [2, 1]


def test_reader_errors(prepared, tmp_path):
    shards = TokenShards(prepared[0])
    with pytest.raises(FileNotFoundError, match="is not a prepared corpus"):
        TokenShards(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="has format 99, this version of moge reads format 1"):
        TokenShards(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        TokenShards(tmp_path)
    with pytest.raises(ValueError, match="domain='nope' is not in this corpus"):
        shards.tokens("train", "nope")
    with pytest.raises(ValueError, match="split='test' is invalid"):
        shards.tokens("test", "prose")
    with pytest.raises(ValueError, match="too few for one window"):
        TrainSampler(shards, batch_size=1, seq_len=10**7)
    with pytest.raises(ValueError, match="too few for one window"):
        next(shards.val_batches("prose", seq_len=10**7, batch_size=1))
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        TrainSampler(shards, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="weights name domain 'poetry'"):
        TrainSampler(shards, batch_size=1, seq_len=8, weights={"poetry": 1.0})
    with pytest.raises(ValueError, match="are all zero"):
        TrainSampler(shards, batch_size=1, seq_len=8, weights={"prose": 0.0})
    with pytest.raises(ValueError, match=r"weights\['prose'\]=-1.0 is invalid"):
        TrainSampler(shards, batch_size=1, seq_len=8, weights={"prose": -1})
    with pytest.raises(ValueError, match="step=-1 is invalid"):
        TrainSampler(shards, batch_size=1, seq_len=8, step=-1)
    with pytest.raises(ValueError, match="micro=-1 are invalid"):
        TrainSampler(shards, batch_size=1, seq_len=8).batch(0, micro=-1)
