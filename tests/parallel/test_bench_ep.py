"""`moge bench-ep` end to end on 2 real processes: MoGE's per-rank load is exactly balanced, top-K's is
not under skewed routing; outputs written; real router logits from a checkpoint; bad input."""

import json

import pytest

from moge.checkpoint import save_pretrained
from moge.cli import main
from moge.data.corpus import Document
from moge.data.prepare import prepare
from moge.data.sources import Source
from moge.nn.model import PanguProMoEForCausalLM
from models import tiny_config


def _summary(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_ep_synthetic_routing(tmp_path, capsys):
    out = _summary(capsys, ["bench-ep", "--ep-sizes", "2", "--tokens", "16,64", "--repeats", "1", "--hidden", "32",
                            "--ffn", "16", "--out", str(tmp_path), "--json"])
    rows = out["summary"]
    assert {(r["source"], r["router"], r["tokens_per_rank"]) for r in rows} == {
        (s, r, t) for s in ("uniform", "skewed") for r in ("grouped", "topk") for t in (16, 64)}
    for r in rows:
        if r["router"] == "grouped":  # K' x groups-per-rank rows from every token of every rank
            assert r["received_max_over_mean"] == 1.0
            assert r["received_max"] == r["tokens_per_rank"] * 8
    skewed_topk = [r for r in rows if r["router"] == "topk" and r["source"] == "skewed"]
    assert all(r["received_max_over_mean"] > 1.0 for r in skewed_topk)
    assert "SYNTHETIC" in out["sources"]["skewed"]
    for name in ("bench_ep.json", "bench_ep.md", "bench_ep.png"):
        assert (tmp_path / name).stat().st_size > 0
    per_rank = json.loads((tmp_path / "bench_ep.json").read_text())["rows"]
    assert {r["rank"] for r in per_rank} == {0, 1}
    assert all(r["expert_cpu_s"] > 0 and r["step_wall_s"] >= r["expert_wall_s"] for r in per_rank)


def _docs(_path):
    import random

    rng = random.Random(0)
    words = "the report shows that the market grew by ten percent this year and stars shall sing".split()
    return [Document("prose", f"p{i}", " ".join(rng.choice(words) for _ in range(600)), "p") for i in range(4)]


def test_bench_ep_with_a_checkpoints_router(tmp_path, capsys):
    prepare(tmp_path / "data", cache_dir=tmp_path / "cache", sources=[Source("prose", "generated", "t", _docs)],
            vocab_size=280, val_fraction=0.25)
    cfg = tiny_config(vocab_size=280, num_heads=2, num_kv_heads=1, shared_expert_intermediate_size=16)
    save_pretrained(PanguProMoEForCausalLM(cfg).init_weights(0.02, seed=0), tmp_path / "ckpt")
    out = _summary(capsys, ["bench-ep", "--ep-sizes", "2,8", "--tokens", "16", "--repeats", "1", "--hidden", "32",
                            "--ffn", "16", "--experts", "8", "--groups", "4", "--top-k", "4", "--checkpoint",
                            str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                            "--json"])
    assert out["sources"]["trained"]["layer"] == 1 and out["sources"]["trained"]["tokens"] > 0
    assert {r["source"] for r in out["summary"]} == {"uniform", "trained"}
    assert out["skipped"] and out["skipped"][0]["ep"] == 8 and "num_groups=4" in out["skipped"][0]["reason"]


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0"], "positive integer"),
    (["--tokens", "a,b"], "comma-separated"),
])
def test_bench_ep_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench-ep", *argv])
    assert message in capsys.readouterr().err


def test_bench_ep_checkpoint_shape_mismatch(tmp_path, capsys):
    cfg = tiny_config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      shared_expert_intermediate_size=16)
    save_pretrained(PanguProMoEForCausalLM(cfg), tmp_path / "ckpt")
    docs = [Document("prose", f"p{i}", "one two three four five six " * 30, "p") for i in range(4)]
    prepare(tmp_path / "data", cache_dir=tmp_path / "cache",
            sources=[Source("prose", "generated", "t", lambda _p: docs)], vocab_size=270, val_fraction=0.25)
    assert main(["bench-ep", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--experts 8 --groups 4 --top-k 4" in capsys.readouterr().err
