"""Losses against hand calculations; Imbalance Score and metrics invariants; Monte Carlo."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from moge.metrics import (LoadTracker, coactivation, contiguous_device_map, device_loads, imbalance_score,
                          intra_group_share, load_stats, sample_experts, simulate_imbalance)
from moge.nn.losses import GlobalBatchAuxLoss, aux_loss, local_group_aux_loss, z_loss
from moge.config import MoEConfig
from moge.nn.routing import route


def test_aux_loss_hand_calculation():
    # N=4 experts, K=1, |B|=2 tokens: token 0 -> expert 0, token 1 -> expert 0
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    ids = torch.tensor([[0], [0]])
    # f = N/(K|B|) * counts = 4/2 * [2,0,0,0] = [4,0,0,0]; p_0 = (0.7+0.4)/2 = 0.55
    assert aux_loss(probs, ids, alpha=0.01).item() == pytest.approx(0.01 * 4 * 0.55)


def test_aux_loss_equals_alpha_under_perfect_balance():
    n, t = 8, 16  # K = 2 slots per token
    probs = torch.full((t, n), 1.0 / n)
    ids = torch.stack([torch.arange(t) % n, (torch.arange(t) + 1) % n], -1)  # each expert exactly 4 times
    assert aux_loss(probs, ids, alpha=0.3).item() == pytest.approx(0.3)


def test_local_group_aux_loss_hand_calculation_and_balance_value():
    # 2 groups of 2 experts, K'=1 per group, 2 tokens
    logits = torch.log(torch.tensor([[0.6, 0.4, 0.2, 0.8], [0.5, 0.5, 0.5, 0.5]]))
    ids = torch.tensor([[0, 3], [0, 2]])
    groups = torch.tensor([0, 0, 1, 1])
    # group 0: local softmax rows [0.6,0.4],[0.5,0.5] -> p=[0.55,0.45]; counts [2,0]; f = 2/(1*2)*c = [2,0]
    # group 1: local softmax [0.2,0.8],[0.5,0.5] -> p=[0.35,0.65]; counts [1,1]; f = [1,1]
    expected = (2 * 0.55 + 0 + 0.35 + 0.65) / 2
    assert local_group_aux_loss(logits, ids, groups, alpha=1.0).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.zeros(4, 4)
    balanced = torch.tensor([[0, 2], [1, 3], [0, 3], [1, 2]])
    assert local_group_aux_loss(uniform, balanced, groups, alpha=0.5).item() == pytest.approx(0.5)


def test_z_loss_hand_calculation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    lse = torch.log(torch.tensor(2.0))
    expected = (lse ** 2 + (1 + lse) ** 2) / 2
    assert z_loss(logits, coef=2.0).item() == pytest.approx(2 * expected.item())


def test_losses_do_not_change_outputs_and_have_gradients():
    from moge.nn.moe import MoGEBlock

    torch.manual_seed(0)
    block = MoGEBlock(MoEConfig(hidden_size=16, num_experts=8, num_groups=4, top_k=4, expert_intermediate_size=8))
    x = torch.randn(12, 16)
    y_plain = block(x)
    y, r = block(x, return_routing=True)
    loss = aux_loss(r.probs_TN, r.experts_TK, 0.01) + z_loss(r.logits_TN, 1e-3) + \
        local_group_aux_loss(r.logits_TN, r.experts_TK, r.group_of_expert_N, 0.01)
    loss.backward()
    assert torch.equal(y_plain, y)
    assert block.router.gate.weight.grad.abs().sum() > 0
    assert block.experts.gate_up_proj.grad is None  # the loss reaches only the router


def test_global_batch_scope_over_micro_batches():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(20, 8), -1)
    ids = torch.rand(20, 8).argsort(-1)[:, :2]
    glob = GlobalBatchAuxLoss(top_k=2, alpha=1.0)
    glob(probs[:10], ids[:10], layer=3)
    last = glob(probs[10:], ids[10:], layer=3)
    counts = torch.bincount(ids.reshape(-1), minlength=8).float()
    f = 8 / (2 * 20) * counts
    assert last.item() == pytest.approx((f * probs[10:].mean(0)).sum().item(), rel=1e-6)
    glob.reset()
    first = glob(probs[:10], ids[:10], layer=3)
    assert first.item() == pytest.approx(aux_loss(probs[:10], ids[:10]).item(), rel=1e-6)


def _dp_worker(rank, world, init_file, probs, ids, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = probs.shape[0] // world
        loss = GlobalBatchAuxLoss(top_k=ids.shape[1])(probs[rank * half:(rank + 1) * half],
                                                      ids[rank * half:(rank + 1) * half])
        out[rank] = loss.item()
    finally:
        dist.destroy_process_group()


def test_global_batch_scope_over_data_parallel_ranks_with_gloo():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(16, 8), -1)
    ids = torch.rand(16, 8).argsort(-1)[:, :2]
    out = torch.zeros(2).share_memory_()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dp_worker, args=(2, os.path.join(d, "init"), probs, ids, out), nprocs=2)
    f = 8 / (2 * 16) * torch.bincount(ids.reshape(-1), minlength=8).float()
    for rank in range(2):
        expected = (f * probs[rank * 8:(rank + 1) * 8].mean(0)).sum().item()
        assert out[rank].item() == pytest.approx(expected, rel=1e-6)


@given(t=st.integers(1, 64), m=st.sampled_from([1, 2, 4, 8]), per=st.integers(1, 4), seed=st.integers(0, 999))
def test_moge_batches_always_have_zero_imbalance(t, m, per, seed):
    n = m * per
    kp = 1 + seed % per
    cfg = MoEConfig(hidden_size=4, num_experts=n, num_groups=m, top_k=m * kp, expert_intermediate_size=4)
    logits = torch.randn(t, n, generator=torch.Generator().manual_seed(seed)) * 4
    r = route(logits, cfg)
    dev = contiguous_device_map(n, m)
    assert imbalance_score(r.experts_TK, dev, m).item() == 0.0
    assert torch.all(device_loads(r.experts_TK, dev, m) == t * kp)


def test_imbalance_score_hand_example():
    # 4 experts on 2 devices; 2 tokens: device loads [3, 1]
    ids = torch.tensor([[0, 1], [2, 0]])
    dev = contiguous_device_map(4, 2)
    assert device_loads(ids, dev, 2).tolist() == [3, 1]
    assert imbalance_score(ids, dev, 2).item() == pytest.approx((3 - 1) / 2)
    # an explicit, non-contiguous map
    assert imbalance_score(ids, torch.tensor([0, 1, 1, 0]), 2).item() == pytest.approx(0.0)


def test_load_metrics():
    counts = torch.tensor([4, 0, 2, 2])
    s = load_stats(counts)
    assert s["max_over_mean"] == pytest.approx(2.0)
    assert s["dead"] == 1
    assert s["cv"] == pytest.approx(torch.tensor([4.0, 0, 2, 2]).std(unbiased=False).item() / 2)
    share = intra_group_share(counts, torch.tensor([0, 0, 1, 1]))
    assert share.tolist() == [1.0, 0.0, 0.5, 0.5]
    c = coactivation(torch.tensor([[0, 2], [0, 3], [1, 2]]), 4)
    assert c[0, 2] == c[2, 0] == 1 and c[0, 3] == 1 and c[0, 1] == 0 and c[0, 0] == 2


def test_tracker_accumulates_and_sees_no_same_group_coactivation_for_moge():
    cfg = MoEConfig(hidden_size=4, num_experts=16, num_groups=4, top_k=4, expert_intermediate_size=4)
    tracker = LoadTracker(num_experts=16, num_groups=4)
    for seed in range(3):
        r = route(torch.randn(32, 16, generator=torch.Generator().manual_seed(seed)), cfg)
        tracker.update(r.experts_TK, layer=0)
    s = tracker.summary()[0]
    assert s["batches"] == 3 and sum(s["expert_counts"]) == 3 * 32 * 4
    assert s["imbalance_score_max"] == 0.0 and s["devices"]["max_over_mean"] == 1.0
    assert s["coactivation_same_group"] == 0 and s["coactivation_cross_group"] > 0
    tracker.reset()
    assert tracker.summary() == {}


def test_monte_carlo_matches_the_spec_numbers():
    top = simulate_imbalance(20000, 16, 64, 8, 8, grouped=False, seed=0).summary()
    moge = simulate_imbalance(2000, 16, 64, 8, 8, grouped=True, seed=0).summary()
    assert top["p_is_positive"] > 0.99
    assert 0.64 < top["mean"] < 0.70
    assert top["mode"] == 0.625
    assert moge["p_is_positive"] == 0.0 and moge["max"] == 0.0


def test_sampled_experts_are_distinct_and_grouped_samples_respect_groups():
    g = torch.Generator().manual_seed(0)
    ex = sample_experts(50, 7, 16, 4, generator=g)
    assert torch.all(ex.sort(-1).values.diff(dim=-1) > 0)
    grouped = sample_experts(50, 7, 16, 4, num_groups=4, generator=g)
    assert torch.equal(grouped // 4, torch.arange(4).expand(50, 7, 4))


def test_skewed_sampling_follows_weights():
    w = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, 1])
    ex = sample_experts(4000, 1, 8, 1, expert_weights=w, generator=torch.Generator().manual_seed(0))
    share0 = (ex == 0).float().mean().item()
    assert share0 == pytest.approx(8 / 15, abs=0.03)


@pytest.mark.parametrize("kwargs,field", [
    (dict(trials=0, tokens=4, num_experts=8, top_k=2), "trials=0"),
    (dict(trials=2, tokens=4, num_experts=8, top_k=9), "top_k=9"),
    (dict(trials=2, tokens=4, num_experts=8, top_k=2, num_groups=3), "num_groups=3"),
])
def test_sampler_rejects_bad_sizes(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample_experts(**kwargs)
