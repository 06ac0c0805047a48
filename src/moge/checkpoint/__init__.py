"""Checkpoints in the released Hugging Face layout (config.json, safetensors shards and an index),
and our own W8A8 format.

One concept per module, each importing only the ones above it in this list:
    files      what a directory holds: config.json, shards + index, pickles (refused unless allowed),
               header reading, errors for missing, truncated or corrupted files
    build      the empty meta-device model a loader fills, routers given their saved bias, buffers
               no file holds rebuilt afterwards
    layout     release keys <-> our stacked state dict (`release_layout`, `LoadPlan`)
    save       `save_pretrained`: shards, index, a commit readers never see half done
    load       the float loader (`load_float`, `load_state_dict_into`)
    quantized  the W8A8 saver and loader, on the same shared helpers
    merge      the SFT checkpoint merge

`load_pretrained` below is the one place that chooses between the float and the quantized loader.
Every problem with the files raises `CheckpointError` (a ValueError) naming the key or file; a file
that is not there raises `MissingCheckpointFileError`, which is also a `FileNotFoundError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moge.checkpoint.build import resolve_dtype
from moge.checkpoint.files import (
    CONFIG_NAME,
    INDEX_NAME,
    PICKLE_INDEX_NAME,
    SINGLE_FILE_NAME,
    MissingCheckpointFileError,
    read_config,
)
from moge.checkpoint.layout import TensorSlot, from_release_state_dict, release_layout, release_state_dict
from moge.checkpoint.load import load_float, load_state_dict_into
from moge.checkpoint.quantized import is_quantized_checkpoint, load_quantized, save_quantized
from moge.checkpoint.save import DEFAULT_MAX_SHARD_BYTES, save_pretrained
from moge.errors import CheckpointError
from moge.nn.model import PanguProMoEForCausalLM

__all__ = [
    "CONFIG_NAME", "INDEX_NAME", "PICKLE_INDEX_NAME", "SINGLE_FILE_NAME", "DEFAULT_MAX_SHARD_BYTES",
    "CheckpointError", "MissingCheckpointFileError", "TensorSlot", "from_release_state_dict",
    "is_quantized_checkpoint", "load_float", "load_pretrained", "load_quantized", "load_state_dict_into",
    "read_config", "release_layout", "release_state_dict", "resolve_dtype", "save_pretrained", "save_quantized",
]


def load_pretrained(directory: str | Path, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu", allow_pickle: bool = False) -> PanguProMoEForCausalLM:
    """Build the model from `directory/config.json` and load its weights, whatever the format.

    A config.json with a `quantization_config` (written by `moge quantize`) loads through
    `load_quantized`; anything else through `load_float`. `dtype` (bf16, fp16, fp32; default: each
    tensor's dtype in the files) converts the floating-point weights (for a quantized checkpoint:
    those that are not quantized). `allow_pickle=True` permits `*.bin` / `*.pt` / `*.pth` float
    weights (read with weights_only=True) when the directory has no safetensors."""
    if "quantization_config" in read_config(directory).extra:
        return load_quantized(directory, dtype=dtype, device=device)
    return load_float(directory, dtype=dtype, device=device, allow_pickle=allow_pickle)
