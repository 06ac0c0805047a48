"""Routers against direct restatements of the paper's definitions."""

import math

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


def _v3_reference(logits, group_of, topk_groups, k, bias=None):
    """DeepSeek-V3 routing of one token, one expert at a time, from the description: affinity
    s_i = sigmoid(logit_i); selection by s_i + b_i; group score = sum of the group's top-2 selection
    scores; keep the topk_groups best groups; top-K experts by selection score among their experts;
    weights = s of the chosen normalised to sum 1. Returns (ids in choice order, weights)."""
    n = len(logits)
    s = [1.0 / (1.0 + math.exp(-x)) for x in logits]
    sel = [s[i] + (bias[i] if bias is not None else 0.0) for i in range(n)]
    groups = sorted(set(group_of))
    group_score = {}
    for g in groups:
        members = sorted((sel[i] for i in range(n) if group_of[i] == g), reverse=True)
        group_score[g] = sum(members[:2])
    kept = sorted(groups, key=lambda g: -group_score[g])[:topk_groups]
    allowed = [i for i in range(n) if group_of[i] in kept]
    chosen = sorted(allowed, key=lambda i: -sel[i])[:k]
    total = sum(s[i] for i in chosen)
    return chosen, [s[i] / total for i in chosen]


@st.composite
def group_limited_cases(draw):
    m = draw(st.sampled_from([1, 2, 4, 8]))
    per = draw(st.integers(1, 5))
    keep = draw(st.integers(1, m))
    k = draw(st.integers(1, keep * per))
    t = draw(st.integers(1, 12))
    explicit = draw(st.booleans())
    biased = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return m, per, keep, k, t, explicit, biased, seed


@given(group_limited_cases())
def test_group_limited_is_deepseek_v3_routing(case):
    """route() against the per-token reference: ids, weights (x router_scale), s' as probs_TN; with
    and without the selection bias, contiguous and explicit expert_to_group."""
    m, per, keep, k, t, explicit, biased, seed = case
    n = m * per
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n, generator=g) * 2
    bias = torch.randn(n, generator=g) * 0.3 if biased else None
    assign = tuple(torch.randperm(n, generator=g).remainder(m).tolist()) if explicit else None
    cfg = MoEConfig(hidden_size=4, num_experts=n, num_groups=m, top_k=k, expert_intermediate_size=4,
                    router="group_limited", topk_groups=keep, expert_to_group=assign)
    group_of = cfg.group_of_expert()
    by_group = torch.tensor(sorted(range(n), key=lambda e: (group_of[e], e))).view(m, per) if explicit else None
    scale = torch.rand(1, n, generator=g) + 0.5
    r = route(logits, cfg, router_scale_1N=scale, bias_N=bias, experts_by_group_GE=by_group)
    assert r.experts_TK.shape == r.weights_TK.shape == (t, k)
    for row in range(t):
        ids, weights = _v3_reference(logits[row].tolist(), group_of, keep, k,
                                     bias.tolist() if bias is not None else None)
        assert r.experts_TK[row].tolist() == ids
        want = torch.tensor(weights) * scale[0, ids]
        torch.testing.assert_close(r.weights_TK[row], want)
        assert len({group_of[e] for e in ids}) <= keep
    s = torch.sigmoid(logits)
    torch.testing.assert_close(r.probs_TN, s / s.sum(-1, keepdim=True))
    # the pure function gives the same routing (weights before router_scale)
    w, e = group_limited_topk(logits, m, keep, k, experts_by_group_GE=by_group, bias_N=bias)
    assert torch.equal(e, r.experts_TK)
    torch.testing.assert_close(w * scale[0, e], r.weights_TK)


def _logit(p):
    return math.log(p / (1 - p))


# 8 experts in 4 groups of 2 (contiguous), chosen so that sigmoid(logit) is a round number.
HAND_S = [0.9, 0.1, 0.7, 0.5, 0.8, 0.3, 0.2, 0.25]


def test_group_limited_hand_computed():
    """Group scores (sum of both members): g0 0.9+0.1=1.0, g1 0.7+0.5=1.2, g2 0.8+0.3=1.1,
    g3 0.2+0.25=0.45. topk_groups=2 keeps g1 and g2, so expert 0 (the best single expert, 0.9) is out.
    Top-2 of {2: 0.7, 3: 0.5, 4: 0.8, 5: 0.3} -> experts 4, 2 with weights 0.8/1.5, 0.7/1.5."""
    cfg = MoEConfig(hidden_size=4, num_experts=8, num_groups=4, top_k=2, expert_intermediate_size=4,
                    router="group_limited", topk_groups=2)
    logits = torch.tensor([[_logit(p) for p in HAND_S]])
    r = route(logits, cfg)
    assert r.experts_TK.tolist() == [[4, 2]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[8 / 15, 7 / 15]]))
    torch.testing.assert_close(r.probs_TN, torch.tensor([HAND_S]) / 3.75)  # sum of the eight s = 3.75


def test_group_limited_hand_computed_with_bias():
    """Bias +0.6 on experts 6, 7: biased group scores g0 1.0, g1 1.2, g2 1.1, g3 0.8+0.85=1.65, so
    g3 and g1 are kept; biased top-2 of {2: 0.7, 3: 0.5, 6: 0.8, 7: 0.85} -> experts 7, 6. Weights
    use the unbiased s: 0.25/0.45 = 5/9 and 0.2/0.45 = 4/9."""
    cfg = MoEConfig(hidden_size=4, num_experts=8, num_groups=4, top_k=2, expert_intermediate_size=4,
                    router="group_limited", topk_groups=2)
    logits = torch.tensor([[_logit(p) for p in HAND_S]])
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0.6, 0.6])
    r = route(logits, cfg, bias_N=bias)
    assert r.experts_TK.tolist() == [[7, 6]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[5 / 9, 4 / 9]]))
    torch.testing.assert_close(r.probs_TN, route(logits, cfg).probs_TN)  # the bias never reaches s'


@given(seed=st.integers(0, 10_000), renormalize=st.booleans())
def test_group_limited_bias_moves_selection_never_weights(seed, renormalize):
    g = torch.Generator().manual_seed(seed)
    cfg = MoEConfig(hidden_size=8, num_experts=16, num_groups=4, top_k=4, expert_intermediate_size=4,
                    router="group_limited", topk_groups=2, aux_free_bias=True, renormalize=renormalize)
    router = Router(cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(16, 8, generator=g))
    x = torch.randn(40, 8, generator=g)
    base = router(x)
    with torch.no_grad():
        router.expert_bias[[5, 6, 9, 10]] = 10.0  # two experts in each of groups 1 and 2
    biased = router(x)
    assert torch.equal(biased.experts_TK.sort(-1).values, torch.tensor([[5, 6, 9, 10]]).expand(40, 4))
    s = torch.sigmoid(biased.logits_TN)
    chosen = s.gather(1, biased.experts_TK)
    # weights: the unbiased affinities normalised over the K chosen, summing to 1 (router_scale = 1),
    # whatever `renormalize` says
    torch.testing.assert_close(biased.weights_TK, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(biased.weights_TK.sum(-1), torch.ones(40))
    torch.testing.assert_close(base.weights_TK.sum(-1), torch.ones(40))
    torch.testing.assert_close(biased.probs_TN, base.probs_TN)
    assert not torch.equal(biased.experts_TK, base.experts_TK)


def test_group_limited_traces_into_one_graph_and_equals_eager():
    """No host sync: the whole route (bias, explicit groups) compiles with fullgraph=True."""
    assign = (0, 1, 2, 3) * 4
    cfg = MoEConfig(hidden_size=4, num_experts=16, num_groups=4, top_k=4, expert_intermediate_size=4,
                    router="group_limited", topk_groups=2, expert_to_group=assign)
    by_group = torch.tensor(sorted(range(16), key=lambda e: (assign[e], e))).view(4, 4)
    logits, bias = torch.randn(9, 16), torch.randn(16) * 0.2

    def run(t):
        r = route(t, cfg, bias_N=bias, experts_by_group_GE=by_group)
        return r.weights_TK, r.experts_TK, r.probs_TN

    got = torch.compile(run, backend="aot_eager", fullgraph=True)(logits)
    for a, b in zip(got, run(logits)):
        torch.testing.assert_close(a, b)


def test_group_limited_update_bias_balances_globally():
    cfg = MoEConfig(hidden_size=4, num_experts=8, num_groups=4, top_k=2, expert_intermediate_size=4,
                    router="group_limited", topk_groups=2, aux_free_bias=True)
    router = Router(cfg).train()
    router(torch.randn(64, 4))
    counts = router.tokens_per_expert.clone()
    assert counts.sum() == 64 * 2
    router.update_bias(rate=0.1)
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(counts.mean() - counts))


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
