"""Loading a float checkpoint in the released layout (safetensors shards, a single file, or opted-in
pickles).

The model is built on the meta device and each weight is allocated once, on the target device, then
filled file by file straight from the shards: peak memory is one copy of the weights plus the tensor
being read. Quantized checkpoints have their own loader (moge.checkpoint.quantized); the package's
`load_pretrained` chooses between the two.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moge.checkpoint.build import add_expert_bias_where_saved, meta_model, rebuild_non_persistent_buffers, resolve_dtype
from moge.checkpoint.files import Source, listing, read_config
from moge.checkpoint.layout import LoadPlan
from moge.nn.model import PanguProMoEForCausalLM


def load_float(directory: str | Path, *, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", allow_pickle: bool = False) -> PanguProMoEForCausalLM:
    """Build the model from `directory/config.json` and load its weights.

    `dtype` (bf16, fp16, fp32; default: each tensor's dtype in the files) converts floating-point
    weights while they are copied in. Every router whose checkpoint holds `router.expert_bias`
    (main layers and MTP modules alike) is built with the aux-loss-free bias so it has a place to go."""
    directory = Path(directory)
    target = resolve_dtype(dtype)
    cfg = read_config(directory)
    source = Source.open(directory, allow_pickle=allow_pickle)
    model = meta_model(cfg)
    add_expert_bias_where_saved(model, source.found)
    plan = LoadPlan.of(model, source.found, where=str(directory))
    tensors = plan.allocate(dtype=target, device=device)
    plan.fill(tensors, source.tensors())
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rebuild_non_persistent_buffers(model, torch.device(device))
    return model


def load_state_dict_into(model: nn.Module, directory: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """Copy a checkpoint's weights into an existing, materialised model, in place.

    Each parameter keeps its dtype and device (values are converted while copied), so optimizer
    references stay valid. A checkpoint without `router.expert_bias` leaves the model's bias as
    it is. For a model on the meta device use `load_pretrained`."""
    state = model.state_dict()
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"model has tensors on the meta device ({listing(meta)}): use load_pretrained, "
                         f"or materialise the model (to_empty) before loading into it")
    directory = Path(directory)
    source = Source.open(directory, allow_pickle=allow_pickle)
    plan = LoadPlan.of(model, source.found, where=str(directory))
    plan.fill(state, source.tensors())
    return model
