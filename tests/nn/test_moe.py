"""MoGEBlock end to end against a reference written straight from the paper's MoGE definition."""

import pytest
import torch
import torch.nn.functional as F

from moge.config import MoEConfig
from moge.nn.experts import reference_experts
from moge.nn.moe import LocalDispatcher, MoGEBlock


def spec_reference(block: MoGEBlock, h: torch.Tensor) -> torch.Tensor:
    """y = sum_i G'(h)_i * router_scale_i * E_i(h) + SharedExpert(h), token by token."""
    cfg = block.cfg
    per = cfg.num_experts // cfg.num_groups
    kp = cfg.top_k // cfg.num_groups
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        s = torch.softmax(block.router.gate.weight @ h[t], -1)
        y = torch.zeros(cfg.hidden_size)
        for j in range(cfg.num_groups):
            block_scores = s[j * per:(j + 1) * per]
            for local in block_scores.topk(kp).indices.tolist():
                i = j * per + local
                gu = block.experts.gate_up_proj[i]
                f = cfg.expert_intermediate_size
                e = block.experts.down_proj[i] @ (F.silu(gu[:f] @ h[t]) * (gu[f:] @ h[t]))
                y = y + s[i] * block.router.router_scale[0, i] * e
        if hasattr(block, "shared_expert"):
            y = y + block.shared_expert(h[t])
        out[t] = y
    return out


def test_block_equals_the_spec_formula():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=16, num_groups=4, top_k=8, expert_intermediate_size=8,
                    shared_expert_sizes=(24,))
    block = MoGEBlock(cfg)
    with torch.no_grad():
        block.router.router_scale.uniform_(0.5, 1.5)
    h = torch.randn(6, 16)
    torch.testing.assert_close(block(h), spec_reference(block, h), atol=1e-5, rtol=1e-5)


def test_any_leading_shape_and_backends_agree():
    torch.manual_seed(0)
    block = MoGEBlock(MoEConfig(hidden_size=16, num_experts=8, num_groups=2, top_k=2, expert_intermediate_size=8))
    x = torch.randn(2, 3, 5, 16)
    y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 16), block(x.reshape(-1, 16)))
    block.experts.backend = "reference"
    torch.testing.assert_close(block(x), y, atol=1e-6, rtol=1e-6)


def test_shared_experts_zero_several_and_gated():
    torch.manual_seed(0)
    base = dict(hidden_size=8, num_experts=4, num_groups=2, top_k=2, expert_intermediate_size=4)
    none = MoGEBlock(MoEConfig(**base))
    assert not any("shared" in n for n, _ in none.named_parameters())
    two = MoGEBlock(MoEConfig(**base, shared_expert_sizes=(4, 12)))
    x = torch.randn(5, 8)
    routed = two.experts(x, *reversed(_ids_weights(two, x)))
    torch.testing.assert_close(two(x), routed + two.shared_experts[0](x) + two.shared_experts[1](x))
    gated = MoGEBlock(MoEConfig(**base, shared_expert_sizes=(4,), shared_expert_gate=True))
    se = gated.shared_expert
    expected = torch.sigmoid(se.gate(x)) * se.down_proj(F.silu(se.gate_proj(x)) * se.up_proj(x))
    torch.testing.assert_close(se(x), expected)


def _ids_weights(block, x):
    r = block.router(x)
    return r.weights_TK, r.experts_TK


def test_release_parameter_names():
    block = MoGEBlock(MoEConfig(hidden_size=8, num_experts=4, num_groups=2, top_k=2, expert_intermediate_size=4,
                                shared_expert_sizes=(16,)))
    names = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert names == {
        "router.gate.weight": (4, 8), "router.router_scale": (1, 4),
        "experts.gate_up_proj": (4, 8, 8), "experts.down_proj": (4, 8, 4),
        "shared_expert.gate_proj.weight": (16, 8), "shared_expert.up_proj.weight": (16, 8),
        "shared_expert.down_proj.weight": (8, 16),
    }


def test_training_step_reduces_loss_for_all_routers():
    for router in ("grouped", "topk", "softmax_topk", "group_limited"):
        torch.manual_seed(0)
        block = MoGEBlock(MoEConfig(hidden_size=16, num_experts=8, num_groups=2, top_k=2,
                                    expert_intermediate_size=16, router=router, topk_groups=1))
        opt = torch.optim.AdamW(block.parameters(), lr=1e-2)
        x, target = torch.randn(64, 16), torch.randn(64, 16)
        first = None
        for _ in range(30):
            loss = F.mse_loss(block(x), target)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.8 * first, router


def test_wrong_input_width_is_rejected():
    block = MoGEBlock(MoEConfig(hidden_size=8, num_experts=4, num_groups=2, top_k=2, expert_intermediate_size=4))
    with pytest.raises(ValueError, match="hidden_size=8"):
        block(torch.randn(3, 7))


def test_the_dispatcher_is_a_swappable_component():
    """router -> dispatcher -> + shared expert: a dispatcher that computes the routed part with the
    paper's formula gives the same output, sees the router's routing, and changes no parameter."""
    torch.manual_seed(0)
    block = MoGEBlock(MoEConfig(hidden_size=16, num_experts=8, num_groups=2, top_k=4, expert_intermediate_size=8,
                                shared_expert_sizes=(8,)))
    x = torch.randn(5, 16)
    want = block(x)
    names = list(block.state_dict())
    seen = []

    class ReferenceDispatcher(LocalDispatcher):
        def __call__(self, x_TD, routing, experts):
            seen.append(routing.experts_TK)
            return reference_experts(x_TD, routing.experts_TK, routing.weights_TK, experts.gate_up_proj,
                                     experts.down_proj)

    block.dispatcher = ReferenceDispatcher()
    torch.testing.assert_close(block(x), want, atol=1e-6, rtol=1e-5)
    assert list(block.state_dict()) == names
    assert torch.equal(seen[0], block.router(x).experts_TK)
