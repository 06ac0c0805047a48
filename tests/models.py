"""The small models the tests build, from one place (import: `from models import tiny_config`).

Every test model is the `moge-tiny` preset shrunk to a few thousand parameters. `tiny_config()` is
the usual shape: 4 heads over 2 KV heads and 8 experts in 4 groups (K' = 1 per group), whose head,
expert, group and shared-expert counts all divide 2 and 4 ranks. A test that needs something else
overrides only that, so the reader sees what matters for it.
"""

from __future__ import annotations

import torch

from moge.config import PRESETS, ModelConfig
from moge.nn.model import PanguProMoEForCausalLM

TINY_SHAPE = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=4,
                  num_groups=4, expert_intermediate_size=16, shared_expert_intermediate_size=24,
                  max_position_embeddings=64)
# One layer, 4 experts in 2 groups: for tests that build many models or enumerate outputs.
SMALLEST_SHAPE = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
                      num_groups=2, expert_intermediate_size=8, shared_expert_intermediate_size=8)


def tiny_config(**overrides) -> ModelConfig:
    return PRESETS["moge-tiny"].replace(**(TINY_SHAPE | overrides))


def smallest_config(**overrides) -> ModelConfig:
    return PRESETS["moge-tiny"].replace(**(SMALLEST_SHAPE | overrides))


def make_model(cfg: ModelConfig | None = None, seed: int = 0) -> PanguProMoEForCausalLM:
    """Random weights with non-trivial values everywhere (norms, router_scale and biases included), so
    a mistake in any of them shows in the outputs. In eval mode."""
    torch.manual_seed(seed)
    model = PanguProMoEForCausalLM(cfg or tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router_scale") or "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def echo_mtp_model(cfg: ModelConfig, seed: int = 1) -> PanguProMoEForCausalLM:
    """A model whose MTP module mostly repeats the trunk's own prediction (eh_proj close to [I, 0],
    small attention and MLP outputs, the trunk's final norm): with a trunk that repeats tokens its
    drafts are often accepted, so speculative decoding's accept and reject paths both run.
    `cfg` must have an MTP module. In eval mode."""
    model = PanguProMoEForCausalLM(cfg).init_weights(0.2, seed=seed).eval()
    mtp, d = model.model.mtp[0], cfg.hidden_size
    with torch.no_grad():
        mtp.eh_proj.weight.mul_(0.01)[:, :d] += torch.eye(d)
        mtp.self_attn.o_proj.weight.mul_(0.05)
        mtp.mlp.experts.down_proj.mul_(0.05)
        for shared in mtp.mlp._shared():
            shared.down_proj.weight.mul_(0.05)
        mtp.norm.weight.copy_(model.model.norm.weight)
    return model
