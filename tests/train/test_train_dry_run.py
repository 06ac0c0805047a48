"""`moge train --dry-run`: per-rank training memory from the trainer's own model and the sharding code
on the meta device, following the shapes (no corpus, processes or weights needed)."""

import json

import pytest
from models import tiny_config

from moge.cli import main
from moge.nn.model import PanguProMoEForCausalLM
from moge.parallel import ExpertParallel, parallelize
from moge.parallel.parallelize import offline_mesh
from moge.train.config import TrainConfig
from moge.train.dryrun import rank_training_memory, train_dry_run
from moge.train.model import build_model

CFG = tiny_config()


def _run(**kw):
    return TrainConfig(batch_size=4, seq_len=16, **kw)


def test_numbers_follow_the_shapes():
    one = train_dry_run(_run(), CFG, 1)[0]
    whole = PanguProMoEForCausalLM(CFG)
    assert one.parameters == sum(p.numel() for p in whole.parameters())
    assert one.weights_bytes == 4 * one.parameters  # fp32, no saved buffers without aux-free routers
    assert one.gradient_bytes == 4 * one.parameters and one.optimizer_bytes == 2 * 4 * one.parameters
    expert_elements = CFG.num_layers * CFG.num_experts * 3 * CFG.hidden_size * CFG.expert_intermediate_size
    assert one.expert_weights_bytes == 4 * expert_elements

    two = train_dry_run(_run(expert_parallel=2), CFG, 2)
    for r in two:  # the experts halve, everything else stays
        assert r.expert_weights_bytes * 2 == one.expert_weights_bytes
        assert r.weights_bytes - r.expert_weights_bytes == one.weights_bytes - one.expert_weights_bytes
        assert r.optimizer_bytes == 2 * 4 * r.parameters
    # data parallel only: every rank holds the whole model, with half the micro-batch
    dp = train_dry_run(_run(), CFG, 2)
    assert all(r.weights_bytes == one.weights_bytes for r in dp)
    assert dp[0].activation_bytes < one.activation_bytes


def test_a_rank_holds_what_the_trainer_builds():
    """Same code path as the run: the sized rank's parameters are those build_model makes for it."""
    run = _run(expert_parallel=2, mtp_modules=1, bias_update_rate=0.01)
    plan = ExpertParallel(2, same_tokens_per_rank=True)
    for rank in range(2):
        local = build_model(CFG, run, lambda m, r=rank: parallelize(m, plan, offline_mesh(plan, 2, r)))
        sized = rank_training_memory(run, CFG, 2, rank)
        assert sized.parameters == sum(p.numel() for p in local.parameters())
        assert sized.weights_bytes == sum(t.numel() * t.element_size() for t in local.state_dict().values())


def test_layout_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size=3 is invalid"):
        train_dry_run(TrainConfig(batch_size=3), CFG, 2)
    with pytest.raises(ValueError, match="expert_parallel=3 is invalid"):
        train_dry_run(TrainConfig(batch_size=6, expert_parallel=3), CFG, 6)


def test_cli_dry_run(tmp_path, capsys):
    CFG.to_json(tmp_path / "model.json")
    args = ["train", "--model", str(tmp_path / "model.json"), "--data", str(tmp_path / "none"), "--dry-run",
            "--world", "4", "--expert-parallel", "2", "--batch-size", "8", "--seq-len", "16"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["ranks"]] == [0, 1, 2, 3]
    assert out["vocab_size"] == CFG.vocab_size and "no corpus" in out["vocab_from"]
    assert all(r["total_bytes"] == r["weights_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"]
               + r["activation_bytes"] for r in out["ranks"])
    assert not (tmp_path / "none").exists()  # nothing written, nothing trained
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "rank 3: weights" in text and "AdamW" in text and "activations:" in text
    assert main([*args, "--world", "0"]) != 0
    assert "world=0 is invalid" in capsys.readouterr().err
