"""`moge generate --dry-run`: per-rank memory from the sharding code on the meta device, equal to
what loading a rank's share allocates, and checked against the simulator's memory model."""

import json

import pytest
import torch
from models import make_model, tiny_config

from moge.checkpoint import save_pretrained
from moge.cli import main
from moge.config import PRESETS
from moge.checkpoint.build import meta_model
from moge.parallel import H2P, ExpertParallel, load_parallel, parallelize
from moge.parallel.dryrun import rank_memory
from moge.parallel.parallelize import offline_mesh
from moge.sim.hardware import load_hardware
from moge.sim.memory import memory_report
from moge.sim.plans import ParallelPlan
from moge.sim.quant import quant_scheme

CFG = tiny_config(vocab_size=61)


@pytest.mark.parametrize("plan,world", [(ExpertParallel(4), 4), (H2P(2, 2), 4)])
def test_dry_run_weights_are_what_loading_allocates(tmp_path, plan, world):
    save_pretrained(make_model(CFG).to(torch.bfloat16), tmp_path)
    for rank in range(world):
        loaded = load_parallel(tmp_path, plan, mesh=offline_mesh(plan, world, rank))
        want = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
        got = rank_memory(CFG, plan, world, rank, dtype=torch.bfloat16, batch=4, context=16)
        assert got.weights_bytes == want
        cache = loaded.allocate_cache(got.sequences, 16, torch.bfloat16)
        assert got.kv_cache_bytes == cache.k.numel() * 2 * 2


def test_pangu_pro_moe_on_8_devices_agrees_with_the_simulator():
    """The paper's H2P layout on 8 devices (attention TP4 x DP2, experts TP2 x EP4, shared TP8), bf16,
    4 sequences of 2048 tokens: the whole weights of every rank (embed_tokens and lm_head split over
    the 8 devices by vocabulary rows, as the simulator's vocab-parallel head) and the KV cache agree."""
    cfg = PRESETS["pangu-pro-moe"]
    sim_plan = ParallelPlan(attn_tp=4, attn_dp=2, expert_tp=2, expert_ep=4, dense_tp=8, name="h2p")
    report = memory_report(cfg, load_hardware("ascend-800i-a2"), sim_plan, quant_scheme("bf16"), seqs=4,
                           cache_tokens_per_seq=2048, step_tokens_per_seq=1, logits_per_seq=1)
    vocab_per_rank = cfg.vocab_size // 8 * cfg.hidden_size * 2  # one vocabulary matrix's rows, bf16
    assert report.weights_detail["embedding"] == report.weights_detail["lm_head"] == pytest.approx(vocab_per_rank)
    for rank in (0, 7):
        got = rank_memory(cfg, H2P(4, 2), 8, rank, dtype=torch.bfloat16, batch=4, context=2048)
        assert got.weights_bytes == pytest.approx(report.weights_bytes, rel=0.01)
        assert got.kv_cache_bytes == pytest.approx(report.kv_cache_bytes, rel=0.01)
    model = meta_model(cfg)
    parallelize(model, H2P(4, 2), offline_mesh(H2P(4, 2), 8, 7))
    assert model.model.embed_tokens.weight.shape == model.lm_head.weight.shape == (cfg.vocab_size // 8, cfg.hidden_size)
    assert model.global_slices["lm_head.weight"].pieces == ((slice(7 * cfg.vocab_size // 8, cfg.vocab_size),),)


def test_cli_dry_run_prints_every_rank(capsys):
    assert main(["generate", "--model", "moge-tiny", "--dry-run", "--parallel", "h2p", "--world", "4",
                 "--attn-tp", "2", "--expert-tp", "2", "--batch", "4", "--context", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["ranks"]] == [0, 1, 2, 3]
    assert all(r["weights_bytes"] > 0 and r["kv_cache_bytes"] > 0 for r in out["ranks"])
    assert out["dtype"] == "bfloat16"
    assert main(["generate", "--model", "moge-tiny", "--dry-run", "--parallel", "ep", "--world", "3"]) == 2
    assert "expert_parallel=3 is invalid" in capsys.readouterr().err
