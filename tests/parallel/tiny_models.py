"""The tiny model the parallel tests split over processes (imported by the test modules and by their
spawned workers, which inherit the test process's sys.path)."""

from models import make_model as _make_model
from models import tiny_config

from moge.nn.model import PanguProMoEForCausalLM

# 4 heads / 2 KV heads, 8 experts in 4 groups, shared expert 24 wide: divisible by 2 and 4 ranks
CFG = tiny_config(vocab_size=61)


def make_model(cfg=CFG, seed=0) -> PanguProMoEForCausalLM:
    """Random weights with non-trivial norms, router_scale and biases (so sharding mistakes show), in
    training mode."""
    return _make_model(cfg, seed).train()
