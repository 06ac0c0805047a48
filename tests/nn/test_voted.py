"""Voted experts: a hand-worked example, invariants, config validation and I/O, the layer and model."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moge.config import PRESETS, ModelConfig, MoEConfig
from moge.nn.moe import MoGEBlock
from moge.nn.routing import grouped_topk, route, set_num_voted_experts, vote_experts


def test_hand_worked_example():
    # 2 groups of 3 experts (0-2, 3-5), K' = 1, keep 2 experts per group.
    probs = torch.tensor([
        [0.30, 0.10, 0.05, 0.20, 0.25, 0.10],  # picks 0 and 4
        [0.05, 0.35, 0.10, 0.30, 0.05, 0.15],  # picks 1 and 3
        [0.40, 0.05, 0.10, 0.05, 0.30, 0.10],  # picks 0 and 4
        [0.05, 0.10, 0.30, 0.10, 0.15, 0.30],  # picks 2 and 5
    ])
    weights, experts = grouped_topk(probs, 2, 1)
    assert experts.tolist() == [[0, 4], [1, 3], [0, 4], [2, 5]]
    # votes: group 0: expert 0 twice, 1 once, 2 once -> keep 0, then 1 (tie with 2: lower id)
    #        group 1: expert 4 twice, 3 once, 5 once -> keep 4, then 3 (tie with 5: lower id)
    new_w, new_e, voted = vote_experts(probs, experts, 2, 1, 2)
    assert voted.tolist() == [[0, 1], [4, 3]]
    # token 3 preferred 2 and 5, both dropped: among {0, 1} 0.10 > 0.05 -> 1; among {3, 4} 0.15 > 0.10 -> 4
    assert new_e.tolist() == [[0, 4], [1, 3], [0, 4], [1, 4]]
    assert torch.equal(new_w, probs.gather(1, new_e))  # the same global-softmax scores
    # keeping one expert per group sends every token to it
    _, e1, v1 = vote_experts(probs, experts, 2, 1, 1)
    assert v1.tolist() == [[0], [4]] and e1.tolist() == [[0, 4]] * 4


def test_ties_go_to_the_expert_listed_first():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    _, experts = grouped_topk(probs, 1, 1)  # expert 3 and expert 0, one vote each
    _, _, voted = vote_experts(probs, experts, 1, 1, 1)
    assert voted.tolist() == [[0]]
    order = torch.tensor([[3, 2, 1, 0]])  # a non-contiguous listing: 3 is first
    _, _, voted = vote_experts(probs, experts, 1, 1, 1, experts_by_group_GE=order)
    assert voted.tolist() == [[3]]


@st.composite
def batches(draw):
    T = draw(st.integers(1, 24))
    G = draw(st.integers(1, 4))
    per = draw(st.integers(1, 5))
    kp = draw(st.integers(1, per))
    voted = draw(st.integers(kp, per))
    seed = draw(st.integers(0, 2**16))
    coarse = draw(st.booleans())  # coarse scores make ties common
    permuted = draw(st.booleans())
    return T, G, per, kp, voted, seed, coarse, permuted


@given(batches())
def test_voting_invariants(case):
    T, G, per, kp, V, seed, coarse, permuted = case
    N = G * per
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, generator=gen)
    if coarse:
        logits = logits.round()
    probs = torch.softmax(logits, -1)
    order = torch.randperm(N, generator=gen).view(G, per) if permuted else torch.arange(N).view(G, per)
    group_of = torch.empty(N, dtype=torch.long)
    group_of[order.reshape(-1)] = torch.arange(G).repeat_interleave(per)
    w0, e0 = grouped_topk(probs, G, kp, experts_by_group_GE=order)
    w, e, voted = vote_experts(probs, e0, G, kp, V, experts_by_group_GE=order)
    assert e.shape == (T, G * kp) and voted.shape == (G, V)
    assert torch.equal(w, probs.gather(1, e))
    for g in range(G):
        kept = set(voted[g].tolist())
        assert kept <= set(order[g].tolist())
        in_g = e[:, g * kp:(g + 1) * kp]
        assert bool((group_of[in_g] == g).all())  # K' experts in every group, group-major
        assert all(len(set(row)) == kp for row in in_g.tolist())  # distinct
        assert set(in_g.reshape(-1).tolist()) <= kept  # only voted experts
        # the voted experts are the most selected ones
        counts = torch.bincount(e0.reshape(-1), minlength=N)
        worst_kept = min(int(counts[x]) for x in kept)
        assert all(int(counts[x]) <= worst_kept for x in set(order[g].tolist()) - kept)
        # each token takes the best of the kept experts
        kept_t = torch.tensor(sorted(kept))
        best = probs[:, kept_t].topk(kp, dim=-1).values
        got = probs.gather(1, in_g).sort(-1, descending=True).values
        assert torch.equal(got, best)
    assert all(len(set(e[:, g * kp:(g + 1) * kp].reshape(-1).tolist())) <= V for g in range(G))
    if V == per:
        assert torch.equal(e, e0) and torch.equal(w, w0)


def test_vote_rejects_impossible_counts():
    probs = torch.softmax(torch.randn(3, 8), -1)
    _, e = grouped_topk(probs, 2, 2)
    with pytest.raises(ValueError, match=r"num_voted=1 is invalid: must be in 2..4"):
        vote_experts(probs, e, 2, 2, 1)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_voted_experts=0), r"num_voted_experts=0 is invalid: must be an integer in 1..4"),
    (dict(num_voted_experts=5), r"num_voted_experts=5 is invalid: must be an integer in 1..4"),
    (dict(num_voted_experts=1, top_k=8), r"num_voted_experts=1 is invalid: must be an integer in 2..4"),
    (dict(num_voted_experts=2.0), r"num_voted_experts=2.0 is invalid"),
    (dict(num_voted_experts=2, router="topk"), r"num_voted_experts=2 is invalid: voted experts need router='grouped'"),
])
def test_config_validation(kwargs, pattern):
    base = dict(hidden_size=8, expert_intermediate_size=4, num_experts=16, num_groups=4, top_k=4)
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**(base | kwargs))
    MoEConfig(**base, num_voted_experts=4)


def test_hf_config_io():
    cfg = PRESETS["moge-tiny"].replace(num_voted_experts=2)
    d = cfg.to_hf_dict()
    assert d["num_voted_experts"] == 2
    back = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert back.num_voted_experts == 2 and back.moe().num_voted_experts == 2
    assert "num_voted_experts" not in PRESETS["moge-tiny"].to_hf_dict()
    for off in (0, None):
        assert ModelConfig.from_hf_dict(PRESETS["moge-tiny"].to_hf_dict() | {"num_voted_experts": off}) \
            .num_voted_experts is None
    with pytest.raises(ValueError, match="num_voted_experts=9"):
        ModelConfig.from_hf_dict(PRESETS["moge-tiny"].to_hf_dict() | {"num_voted_experts": 9})


def test_route_and_block_use_voting():
    cfg = MoEConfig(hidden_size=16, num_experts=16, num_groups=4, top_k=8, expert_intermediate_size=8,
                    num_voted_experts=3)
    torch.manual_seed(0)
    block = MoGEBlock(cfg).eval()
    x = torch.randn(40, 16)
    y, r = block(x, return_routing=True)
    for g in range(4):
        in_g = r.experts_TK[:, g * 2:(g + 1) * 2]
        assert len(set(in_g.reshape(-1).tolist())) <= 3
        assert bool((in_g // 4 == g).all())
    plain = route(r.logits_TN, MoEConfig(**{**cfg.__dict__, "num_voted_experts": None}))
    _, expected, _ = vote_experts(plain.probs_TN, plain.experts_TK, 4, 2, 3)
    assert torch.equal(r.experts_TK, expected)


def test_set_num_voted_experts_on_a_model():
    from test_model import make_model

    model = make_model()  # 8 experts in 4 groups, K' = 1
    ids = torch.randint(0, 97, (4, 12))
    with torch.no_grad():
        base = model(ids, return_routing=True)
        set_num_voted_experts(model, 1)
        voted = model(ids, return_routing=True)
        set_num_voted_experts(model, None)
        again = model(ids).logits
    assert torch.equal(base.logits, again)
    for r in voted.routing:  # one expert per group for the whole batch
        assert torch.unique(r.experts_TK).numel() == 4
    assert not torch.equal(base.logits, voted.logits)
    with pytest.raises(ValueError, match="num_voted_experts=3 is invalid"):
        set_num_voted_experts(model, 3)
