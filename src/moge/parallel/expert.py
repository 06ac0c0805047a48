"""Expert-parallel state: which parameters are sharded, sharding a model or a state dict, and
gathering the whole model back.

An expert-parallel rank keeps the router and the shared expert whole (they are small and every
token needs them) and 1/ep of the routed experts (moge.parallel.parallelize). Parameter names stay
those of the single-process model (`model.layers.3.mlp.experts.gate_up_proj` is this rank's
[N/ep, 2F, D] slice), so a sharded state dict maps to the full one by concatenating the expert
tensors over the EP group in rank order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.distributed as dist
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.parallel.mesh import ExpertParallelMesh
from moge.parallel.parallelize import ExpertParallel, parallelize

EXPERT_KEY = ".mlp.experts."


def is_expert_param(name: str) -> bool:
    """Sharded over the EP group (routed expert weights) rather than replicated on every rank."""
    return EXPERT_KEY in f".{name}"


def shard_model(model: nn.Module, mesh: ExpertParallelMesh, same_tokens_per_rank: bool = False) -> nn.Module:
    """`parallelize(model, ExpertParallel(mesh.ep, same_tokens_per_rank), mesh)`: every MoGEBlock of
    `model` (or `model` itself) keeps this rank's experts and dispatches by all-to-all. In place;
    returns the model."""
    return parallelize(model, ExpertParallel(mesh.ep, same_tokens_per_rank), mesh)


def shard_state_dict(full: Mapping[str, Tensor], mesh: ExpertParallelMesh) -> dict[str, Tensor]:
    """This rank's part of a whole-model state dict (expert tensors sliced along dim 0)."""
    out = {}
    for name, t in full.items():
        if is_expert_param(name):
            if t.shape[0] % mesh.ep:
                raise ConfigError(f"expert_parallel={mesh.ep} is invalid for {name}: must divide its "
                                  f"{t.shape[0]} experts")
            mine = mesh.expert_range(t.shape[0])
            out[name] = t[mine.start:mine.stop]
        else:
            out[name] = t
    return out


def gather_expert_tensor(t: Tensor, mesh: ExpertParallelMesh) -> Tensor:
    """Concatenate this rank's expert shard with the other EP ranks' (in rank order)."""
    if mesh.ep == 1:
        return t
    out = t.new_empty((t.shape[0] * mesh.ep, *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=mesh.ep_group)
    return out


def full_state_dict(model: nn.Module, mesh: ExpertParallelMesh | None) -> dict[str, Tensor]:
    """The whole model's state dict (as a single process would have it), on every rank of the EP
    group. Collective: all ranks must call it."""
    state = model.state_dict()
    if mesh is None:
        return state
    return {name: gather_expert_tensor(t, mesh) if is_expert_param(name) else t for name, t in state.items()}
