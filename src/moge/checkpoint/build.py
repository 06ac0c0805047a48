"""The empty model a loader fills: built on the meta device from config.json, given an aux-loss-free
router wherever the files hold one's bias, and completed afterwards with the buffers no file holds.
Shared by the float and the quantized loaders."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import replace

import torch
from torch import nn

from moge.checkpoint.files import listing
from moge.config import ModelConfig
from moge.errors import CheckpointError, bad_value
from moge.nn.model import PanguProMoEForCausalLM
from moge.nn.routing import Router

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a floating torch dtype, or one of the names bf16/bfloat16, fp16/float16/half, fp32/float32."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    elif dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise bad_value("dtype", dtype, f"choose one of {sorted(_DTYPE_NAMES)} or torch.float32 / torch.bfloat16 / "
                                    f"torch.float16 (or None to keep the files' dtype)")


def meta_model(cfg: ModelConfig) -> PanguProMoEForCausalLM:
    """The model with every tensor on the meta device: shapes without memory."""
    with torch.device("meta"):
        return PanguProMoEForCausalLM(cfg)


def add_expert_bias_where_saved(model: nn.Module, found: Container[str]) -> list[str]:
    """Give every router whose `<name>.expert_bias` is among the saved keys the aux-loss-free bias.

    config.json cannot say a router has the bias (it is training state, not architecture); the saved
    tensor says it. Every Router in the model counts: the main layers' and the MTP modules'.
    Returns the names of the routers rebuilt."""
    rebuilt = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Router) and module.expert_bias is None and f"{name}.expert_bias" in found:
            parent_name, _, attr = name.rpartition(".")
            with torch.device(module.gate.weight.device):
                router = Router(replace(module.cfg, aux_free_bias=True))
            setattr(model.get_submodule(parent_name), attr, router)
            rebuilt.append(name)
    return rebuilt


def rebuild_non_persistent_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Buffers that are not saved (e.g. the router's expert-to-group table) are still on the meta
    device after loading: re-run the owning module's own constructor on the CPU (cheap for the
    modules that have such buffers) and take its values, so no formula is duplicated here."""
    for name, module in model.named_modules():
        stale = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if not stale:
            continue
        cfg = getattr(module, "cfg", None)
        if cfg is None:
            raise CheckpointError(f"cannot rebuild buffers {stale} of module {name!r} "
                                  f"({type(module).__name__}): it has no `cfg` to rebuild from")
        with torch.device("cpu"):
            fresh = type(module)(cfg)
        for b in stale:
            setattr(module, b, getattr(fresh, b).to(device))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors still on the meta device after loading: {listing(left)}")
