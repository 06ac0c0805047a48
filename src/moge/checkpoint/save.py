"""Saving in the released layout: config.json, `model-0000i-of-0000n.safetensors` shards and the
index, committed so that a reader never sees a mix of an old and a new checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from moge.checkpoint.build import resolve_dtype
from moge.checkpoint.files import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME, is_plain_name, listing
from moge.checkpoint.layout import TensorSlot, release_layout
from moge.errors import ConfigError, bad_value
from moge.io import atomic_write_bytes, atomic_write_text
from moge.nn.model import PanguProMoEForCausalLM

# A shard is held twice in memory while it is written (tensors + serialised bytes), so keep it
# well below host memory; Hugging Face's own default is 5 GB.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def save_pretrained(model: PanguProMoEForCausalLM, directory: str | Path, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype: torch.dtype | str | None = None,
                    state_dict: Mapping[str, Tensor] | None = None) -> Path:
    """Write config.json, `model-0000i-of-0000n.safetensors` shards in the release layout and
    `model.safetensors.index.json` (always, even for one shard). Returns the directory.

    `state_dict` writes these weights instead of `model.state_dict()` (the whole model gathered from
    expert-parallel ranks, say); `model` then only supplies the config.
    `dtype` converts floating-point tensors on the way out (default: keep each tensor's dtype).
    A tensor larger than `max_shard_bytes` gets a shard of its own. Saving over an existing
    checkpoint is safe for readers: everything is written to a staging folder first, the old index
    is removed before any old shard is replaced and the new index is written last, so a reader
    sees either the old checkpoint, the new one, or none (no index) - never a mix. Shards of the
    old checkpoint that the new one does not use are deleted afterwards, as is a single-file
    `model.safetensors`, which other loaders would prefer over the index."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise bad_value("max_shard_bytes", max_shard_bytes, "must be a positive integer")
    target = resolve_dtype(dtype)
    state = model.state_dict() if state_dict is None else dict(state_dict)
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save a model with tensors on the meta device ({listing(meta)}); "
                         f"load or initialise its weights first")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"checkpoint directory={str(directory)!r} is a file; give a directory path")
    directory.mkdir(parents=True, exist_ok=True)

    layout = release_layout(state, tie_word_embeddings=model.config.tie_word_embeddings)
    shards = _split_into_shards(layout, state, target, max_shard_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".moge-save-"))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for name, shard in zip(names, shards, strict=True):
            tensors = {slot.release_key: _for_file(slot.of(state), target) for slot in shard}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write_bytes(staging / name, safetensors_bytes(tensors, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        model.config.to_json(staging / CONFIG_NAME)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _commit(directory, staging, names, json.dumps(index, indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _split_into_shards(layout: list[TensorSlot], state: Mapping[str, Tensor], target: torch.dtype | None,
                       max_shard_bytes: int) -> list[list[TensorSlot]]:
    """Greedy, in layout order, so the same model always gives the same shards."""
    shards: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in layout:
        t = slot.of(state)
        dtype = target if target is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += nbytes
    return shards


def _for_file(t: Tensor, target: torch.dtype | None) -> Tensor:
    """A CPU copy that owns its memory (expert slices share storage with the stacked tensor)."""
    dtype = target if target is not None and t.is_floating_point() else t.dtype
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _commit(directory: Path, staging: Path, names: list[str], index_text: str) -> None:
    """Swap the staged files in: old index out first, new index in last, then drop stale shards."""
    old: set[str] = set()
    index_path = directory / INDEX_NAME
    if index_path.exists():
        try:
            old = {n for n in json.loads(index_path.read_text()).get("weight_map", {}).values()
                   if isinstance(n, str) and is_plain_name(n)}
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            old = set()
        index_path.unlink()
    for name in names:
        os.replace(staging / name, directory / name)
    os.replace(staging / CONFIG_NAME, directory / CONFIG_NAME)
    atomic_write_text(index_path, index_text)
    stale = old | {p.name for p in directory.iterdir() if _SHARD_NAME.match(p.name)} | {SINGLE_FILE_NAME}
    for name in stale - set(names):
        (directory / name).unlink(missing_ok=True)
