"""`load_parallel`: a rank's share of a checkpoint, read without ever holding the whole model.

The model is built on the meta device, `parallelize` slices it there (shapes only) and records
which part of which single-process tensor every local tensor holds; `moge.checkpoint.partial`
then reads exactly those parts from the safetensors shards. The result equals
`parallelize(load_pretrained(directory), plan)` on every rank, for float and W8A8 checkpoints
alike (a W8A8 model is built with its quantized modules before the plan slices it, so a rank reads
its rows of the int8 weights and of their scales).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moge.checkpoint.build import rebuild_non_persistent_buffers, resolve_dtype
from moge.checkpoint.partial import PartialSource
from moge.nn.model import PanguProMoEForCausalLM
from moge.parallel.mesh import ExpertParallelMesh, H2PMesh
from moge.parallel.parallelize import H2P, ExpertParallel, parallelize


def load_parallel(directory: str | Path, plan: ExpertParallel | H2P, *, dtype: torch.dtype | str | None = None,
                  device: torch.device | str = "cpu",
                  mesh: ExpertParallelMesh | H2PMesh | None = None) -> PanguProMoEForCausalLM:
    """This rank's share of the safetensors checkpoint (float or W8A8) in `directory` under `plan`,
    on `device`, in `dtype` (default: the files' dtype; a W8A8 model's int8 weights, scales and
    biases always keep theirs). Collective like `parallelize` (its groups are created here unless
    `mesh` is given). Pickle checkpoints raise CheckpointError."""
    source = PartialSource.open(directory)
    target = resolve_dtype(dtype)
    model = source.meta_model()
    parallelize(model, plan, mesh)
    load_shards(model, source, dtype=target, device=device)
    return model


def load_shards(model: nn.Module, source: PartialSource | str | Path, *, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> nn.Module:
    """Fill a parallelized model with its share of a checkpoint, in place. A model on the meta
    device gets new tensors (`dtype`, `device`); a materialised one is copied into, each tensor
    keeping its dtype and device (optimizer references stay valid)."""
    if not isinstance(source, PartialSource):
        source = PartialSource.open(source)
    slices = getattr(model, "global_slices", None)
    if slices is None:
        raise ValueError("the model has no global_slices: apply a plan with moge.parallel.parallelize first")
    local = model.state_dict()
    if not any(t.is_meta for t in local.values()):
        source.fill(local, slices)
        return model
    tensors = source.allocate(local, slices, dtype=dtype, device=device)
    source.fill(tensors, slices)
    model.load_state_dict(tensors, strict=True, assign=True)
    if source.plan.tied and isinstance(model, PanguProMoEForCausalLM):
        model.lm_head.weight = model.model.embed_tokens.weight
    rebuild_non_persistent_buffers(model, torch.device(device))
    return model
