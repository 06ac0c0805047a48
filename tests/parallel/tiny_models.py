"""The tiny model the parallel tests split over processes (imported by the test modules and by their
spawned workers)."""

import torch

from moge.config import PRESETS
from moge.nn.model import PanguProMoEForCausalLM

# 4 heads / 2 KV heads, 8 experts in 4 groups, shared expert 24 wide: divisible by 2 and 4 ranks
CFG = PRESETS["moge-tiny"].replace(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   num_experts=8, top_k=4, num_groups=4, expert_intermediate_size=16,
                                   shared_expert_intermediate_size=24, max_position_embeddings=64)


def make_model(cfg=CFG, seed=0) -> PanguProMoEForCausalLM:
    """Random weights with non-trivial norms, router_scale and biases (so sharding mistakes show)."""
    torch.manual_seed(seed)
    model = PanguProMoEForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router_scale") or "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model
