"""Routers against direct restatements of the paper's definitions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moge.config import MoEConfig
from moge.nn.routing import Router, expert_counts, group_limited_topk, grouped_topk, route


@st.composite
def grouped_shapes(draw):
    m = draw(st.sampled_from([1, 2, 4, 8]))
    per = draw(st.integers(1, 6))
    kp = draw(st.integers(1, per))
    t = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 10_000))
    return m * per, m, kp, t, seed


@given(grouped_shapes())
def test_grouped_keeps_exactly_k_prime_per_group_and_global_softmax_weights(shape):
    n, m, kp, t, seed = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n, generator=g) * 3
    cfg = MoEConfig(hidden_size=4, num_experts=n, num_groups=m, top_k=m * kp, expert_intermediate_size=4)
    scale = torch.rand(1, n, generator=g) + 0.5
    r = route(logits, cfg, router_scale_1N=scale)
    probs = torch.softmax(logits, -1)
    assert r.experts_TK.shape == (t, m * kp)
    group = r.experts_TK // (n // m)
    for j in range(m):
        assert torch.all((group == j).sum(-1) == kp)
    # chosen experts are distinct and are the top-K' inside each group
    for row in range(t):
        chosen = set(r.experts_TK[row].tolist())
        assert len(chosen) == m * kp
        for j in range(m):
            block = probs[row, j * (n // m):(j + 1) * (n // m)]
            kth = block.topk(kp).values[-1]
            for e in chosen:
                if e // (n // m) == j:
                    assert probs[row, e] >= kth
    # weights: global softmax (not renormalised) times router_scale
    expected = probs.gather(1, r.experts_TK) * scale[0, r.experts_TK]
    torch.testing.assert_close(r.weights_TK, expected)
    torch.testing.assert_close(r.probs_TN, probs)


def test_grouped_renormalise_option():
    logits = torch.randn(7, 16)
    cfg = MoEConfig(hidden_size=4, num_experts=16, num_groups=4, top_k=4, expert_intermediate_size=4,
                    renormalize=True)
    r = route(logits, cfg)
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(7))
    raw = route(logits, MoEConfig(hidden_size=4, num_experts=16, num_groups=4, top_k=4,
                                  expert_intermediate_size=4))
    assert torch.all(raw.weights_TK.sum(-1) < 1)


def test_explicit_group_assignment_routes_inside_the_given_groups():
    n, m = 8, 2
    assign = (0, 1, 0, 1, 0, 1, 0, 1)  # even experts in group 0, odd in group 1
    cfg = MoEConfig(hidden_size=4, num_experts=n, num_groups=m, top_k=2, expert_intermediate_size=4,
                    expert_to_group=assign)
    router = Router(cfg)
    x = torch.randn(50, 4)
    r = router(x)
    parity = r.experts_TK % 2
    assert torch.all(parity[:, 0] == 0) and torch.all(parity[:, 1] == 1)
    probs = r.probs_TN
    assert torch.equal(r.experts_TK[:, 0], 2 * probs[:, 0::2].argmax(-1))
    assert torch.equal(r.experts_TK[:, 1], 2 * probs[:, 1::2].argmax(-1) + 1)
    assert r.group_of_expert_N.tolist() == list(assign)


def test_topk_router_is_eq2_softmax_over_kept_logits():
    logits = torch.randn(9, 12)
    cfg = MoEConfig(hidden_size=4, num_experts=12, num_groups=1, top_k=3, expert_intermediate_size=4, router="topk")
    r = route(logits, cfg)
    top = logits.topk(3, -1)
    torch.testing.assert_close(r.weights_TK, torch.softmax(top.values, -1))
    assert torch.equal(r.experts_TK, top.indices)


def test_softmax_topk_variant_with_and_without_renormalise():
    logits = torch.randn(9, 12)
    probs = torch.softmax(logits, -1)
    base = dict(hidden_size=4, num_experts=12, num_groups=1, top_k=3, expert_intermediate_size=4,
                router="softmax_topk")
    r = route(logits, MoEConfig(**base))
    torch.testing.assert_close(r.weights_TK, probs.topk(3, -1).values)
    rn = route(logits, MoEConfig(**base, renormalize=True))
    v = probs.topk(3, -1).values
    torch.testing.assert_close(rn.weights_TK, v / v.sum(-1, keepdim=True))


def test_group_limited_matches_a_direct_restatement():
    torch.manual_seed(3)
    t, n, m, keep, k = 30, 16, 4, 2, 4
    probs = torch.softmax(torch.randn(t, n), -1)
    w, e = group_limited_topk(probs, m, keep, k)
    for row in range(t):
        scores = [probs[row, j * 4:(j + 1) * 4].topk(2).values.sum().item() for j in range(m)]
        groups = sorted(range(m), key=lambda j: -scores[j])[:keep]
        allowed = [x for j in groups for x in range(j * 4, (j + 1) * 4)]
        best = sorted(allowed, key=lambda x: -probs[row, x].item())[:k]
        assert sorted(e[row].tolist()) == sorted(best)
        assert len({x // 4 for x in e[row].tolist()}) <= keep
    torch.testing.assert_close(w, probs.gather(1, e))


def test_gradients_reach_gate_weight_and_router_scale():
    cfg = MoEConfig(hidden_size=8, num_experts=16, num_groups=4, top_k=4, expert_intermediate_size=4)
    router = Router(cfg)
    r = router(torch.randn(10, 8))
    (r.weights_TK * torch.randn_like(r.weights_TK)).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    assert router.router_scale.grad is not None and router.router_scale.grad.abs().sum() > 0
    assert router.router_scale.shape == (1, 16) and torch.all(router.router_scale == 1)


def test_router_maths_is_fp32_for_bf16_inputs():
    cfg = MoEConfig(hidden_size=8, num_experts=16, num_groups=4, top_k=4, expert_intermediate_size=4)
    router = Router(cfg).to(torch.bfloat16)
    r = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert r.logits_TN.dtype == r.probs_TN.dtype == r.weights_TK.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise(bad):
    cfg = MoEConfig(hidden_size=4, num_experts=8, num_groups=2, top_k=2, expert_intermediate_size=4,
                    check_finite=True)
    logits = torch.randn(4, 8)
    logits[2, 3] = bad
    with pytest.raises(FloatingPointError, match="1 of 4 tokens"):
        route(logits, cfg)
    # compiled, the check is a device-side assert (no host sync, no graph break)
    compiled = torch.compile(lambda t: route(t, cfg).weights_TK, backend="aot_eager", fullgraph=True)
    assert compiled(torch.randn(4, 8)).shape == (4, 2)
    with pytest.raises(RuntimeError, match="router logits are not finite"):
        compiled(logits)


@given(t=st.integers(0, 30), n=st.integers(1, 9), k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_expert_counts_equal_bincount(t, n, k, seed):
    ids = torch.randint(0, n, (t, k), generator=torch.Generator().manual_seed(seed))
    counts = expert_counts(ids, n)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=n))


def test_aux_free_bias_changes_selection_not_weights_and_updates_by_sign():
    cfg = MoEConfig(hidden_size=4, num_experts=8, num_groups=2, top_k=2, expert_intermediate_size=4,
                    aux_free_bias=True)
    router = Router(cfg)
    x = torch.randn(64, 4)
    base = router(x)
    with torch.no_grad():
        router.expert_bias[:] = torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 5.0])
    biased = router(x)
    assert torch.all(biased.experts_TK[:, 0] == 0) and torch.all(biased.experts_TK[:, 1] == 7)
    torch.testing.assert_close(biased.weights_TK, biased.probs_TN.gather(1, biased.experts_TK))
    torch.testing.assert_close(biased.probs_TN, base.probs_TN)
    router.expert_bias.zero_()
    router.tokens_per_expert.zero_()
    router.train()
    router(x)
    counts = router.tokens_per_expert.clone()
    router.update_bias(rate=0.1)
    per_group_mean = counts.view(2, 4).mean(-1, keepdim=True).expand(2, 4).reshape(-1)
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(per_group_mean - counts))
    assert router.tokens_per_expert.sum() == 0


def test_grouped_topk_direct_call_matches_contiguous_explicit_listing():
    probs = torch.softmax(torch.randn(11, 12), -1)
    w1, e1 = grouped_topk(probs, 3, 2)
    w2, e2 = grouped_topk(probs, 3, 2, experts_by_group_GE=torch.arange(12).view(3, 4))
    assert torch.equal(e1.sort(-1).values, e2.sort(-1).values)
