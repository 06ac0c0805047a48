"""The empty model a loader fills: built on the meta device from config.json, given an aux-loss-free
router wherever the files hold one's bias, and completed afterwards with the buffers no file holds.
Shared by the float and the quantized loaders."""

from __future__ import annotations

import json
from collections.abc import Container, Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from moge.checkpoint.files import CONFIG_NAME, MissingCheckpointFileError, Source, listing
from moge.config import TORCH_DTYPES, ModelConfig
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


def checkpoint_dtype(directory: str | Path) -> torch.dtype | None:
    """The dtype the weights are saved in: what loading defaults to. Read from the safetensors
    headers (the floating dtype holding the most elements), which is the truth even for files whose
    config.json misnames it (ours wrote "bfloat16" over fp32 weights before `saved_dtype_name`);
    config.json's `torch_dtype` (or transformers 5's `dtype`) when the headers cannot be read. None
    when neither names one (then each tensor keeps its dtype in the files)."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingCheckpointFileError(f"{path} is missing: a checkpoint directory needs the model's "
                                         f"config.json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    name = data.get("torch_dtype", data.get("dtype")) if isinstance(data, dict) else None
    if name is not None and (not isinstance(name, str) or name.lower().removeprefix("torch.") not in _DTYPE_NAMES):
        raise CheckpointError(f"{path}: torch_dtype={name!r} is not a dtype this loader reads: expected one of "
                              f"{TORCH_DTYPES}")
    stored = _stored_dtype(Path(directory))
    if stored is not None or name is None:
        return stored
    return _DTYPE_NAMES[name.lower().removeprefix("torch.")]


def _stored_dtype(directory: Path) -> torch.dtype | None:
    try:
        found = Source.open(directory).found
    except (CheckpointError, OSError):
        return None
    elements: dict[torch.dtype, int] = {}
    for shape, dtype in found.values():
        if dtype is not None and dtype.is_floating_point:
            elements[dtype] = elements.get(dtype, 0) + int(torch.Size(shape).numel())
    return max(elements, key=elements.__getitem__) if elements else None


def saved_dtype_name(tensors: Iterable[Tensor], target: torch.dtype | None = None) -> str | None:
    """config.json's `torch_dtype` for these weights written with floating tensors converted to
    `target` (None: as they are): the floating dtype holding the most elements (None when none is
    floating)."""
    elements: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            dtype = target or t.dtype
            elements[dtype] = elements.get(dtype, 0) + t.numel()
    if not elements:
        return None
    name = str(max(elements, key=elements.__getitem__)).removeprefix("torch.")
    return name if name in TORCH_DTYPES else None


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
