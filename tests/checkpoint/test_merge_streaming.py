"""`moge merge` streams: the two-level formula on disk, the base's files and dtypes kept, errors before
any output, and a peak memory of a few tensors (measured in a fresh process)."""

import json

import pytest
import torch
from memory import reset_peak, rss_kib
from models import make_model, smallest_config, tiny_config

from moge.checkpoint import load_pretrained, save_pretrained
from moge.checkpoint.merge import merge_checkpoints
from moge.cli import main
from moge.parallel.launch import spawn

# experts are most of the bytes, one release tensor per expert: 3 layers x 8 experts x 3 x 128 x 1024 fp32
BIG = tiny_config(vocab_size=256, hidden_size=128, num_heads=4, num_kv_heads=2, num_experts=8, num_groups=4,
                  top_k=4, expert_intermediate_size=1024, shared_expert_intermediate_size=128, num_layers=3)


def _save(models, root, **kw):
    paths = []
    for i, m in enumerate(models):
        save_pretrained(m, root / f"c{i}", **kw)
        paths.append(root / f"c{i}")
    return paths


def test_two_level_merge_on_disk_equals_the_formula(tmp_path):
    models = [make_model(tiny_config(), seed=s) for s in range(4)]
    base, a1, a2, b1 = _save(models, tmp_path, max_shard_bytes=30_000)
    (base / "tokenizer.json").write_text("{}")
    out = merge_checkpoints(base, [[a1, a2], [b1]], [0.6, 0.3], tmp_path / "merged")
    got = load_pretrained(out).state_dict()
    sd = [m.state_dict() for m in models]
    for k in got:
        want = sd[0][k] + 0.6 * ((sd[1][k] - sd[0][k]) + (sd[2][k] - sd[0][k])) / 2 + 0.3 * (sd[3][k] - sd[0][k])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)
    # the base's shard files, index and side files
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]


def test_bf16_checkpoints_merge_in_fp32_and_stay_bf16(tmp_path):
    models = [make_model(smallest_config(), seed=s).to(torch.bfloat16) for s in range(2)]
    base, other = _save(models, tmp_path)
    got = load_pretrained(merge_checkpoints(base, [[other]], [0.5], tmp_path / "m")).state_dict()
    sd = [m.state_dict() for m in models]
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        want = (sd[0][k].float() + 0.5 * (sd[1][k].float() - sd[0][k].float())).to(torch.bfloat16)
        assert torch.equal(v, want)


def test_bad_merges_write_nothing(tmp_path, capsys):
    base, other = _save([make_model(smallest_config(), seed=s) for s in range(2)], tmp_path)
    wide = tmp_path / "wide"
    save_pretrained(make_model(smallest_config(hidden_size=32)), wide)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="different model config"):
        merge_checkpoints(base, [[other, wide]], [1.0], out)
    with pytest.raises(ValueError, match="2 checkpoint groups but 1 lambdas"):
        merge_checkpoints(base, [[other], [other]], [1.0], out)
    assert not out.exists() and not list(tmp_path.glob(".out.merge-*"))
    assert main(["merge", "--base", str(base), "--group", str(other), "--lam", "1", "--group", str(other),
                 "--out", str(out)]) == 2
    assert "give one --lam per --group" in capsys.readouterr().err and not out.exists()


def _merge_worker(rank, world, root):
    from pathlib import Path

    root = Path(root)
    # warm the code paths (imports, the first reads and writes) on a small merge first
    merge_checkpoints(root / "s0", [[root / "s1"]], [0.5], root / "warm")
    reset_peak()
    baseline = rss_kib("VmRSS")
    merge_checkpoints(root / "c0", [[root / "c1"], [root / "c2"]], [0.5, 0.5], root / "merged")
    return {"peak_above_baseline": (rss_kib("VmHWM") - baseline) * 1024}


def test_merge_peak_memory_is_a_few_tensors(tmp_path, monkeypatch):
    paths = _save([make_model(BIG, seed=s) for s in range(3)], tmp_path)
    for i, m in enumerate([make_model(smallest_config(), seed=s) for s in range(2)]):
        save_pretrained(m, tmp_path / f"s{i}")
    one = sum(p.stat().st_size for p in paths[0].glob("*.safetensors"))
    # a fixed glibc mmap threshold, so freed tensor blocks go back to the system (see test_sharded_loading)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    (result,) = spawn(_merge_worker, 1, str(tmp_path))
    peak = result["peak_above_baseline"]
    print(f"merge of base + 2 checkpoints of {one / 1e6:.1f} MB: peak RSS {peak / 1e6:.1f} MB above the baseline")
    assert peak < 0.6 * one, (peak, one)
    want = make_model(BIG, seed=1).state_dict()  # base + 0.5 (c1 - base) + 0.5 (c2 - base) = (c1 + c2) / 2
    other = make_model(BIG, seed=2).state_dict()
    got = load_pretrained(tmp_path / "merged").state_dict()
    for k in got:
        torch.testing.assert_close(got[k], (want[k] + other[k]) / 2, rtol=1e-5, atol=1e-6)
