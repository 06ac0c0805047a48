"""Saving in the released layout: config.json, `model-0000i-of-0000n.safetensors` shards and the
index, committed so that a reader never sees a mix of an old and a new checkpoint.

`save_pretrained` writes a whole model from one process. `save_expert_parallel_part` writes one
expert-parallel rank's part of the same kind of checkpoint without the whole model on any rank: the
shard plan (`expert_parallel_shards`) is a pure function of the shapes, so every rank computes the
same file names, EP rank r writes the files holding its experts (streamed tensor by tensor) and EP
rank 0 also writes the replicated tensors, config.json and the index."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moge.checkpoint.build import resolve_dtype, saved_dtype_name
from moge.checkpoint.files import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME, is_plain_name, listing
from moge.checkpoint.layout import TensorSlot, release_layout
from moge.errors import ConfigError, bad_value
from moge.io import atomic_write_text
from moge.nn.model import PanguProMoEForCausalLM

# A shard is held twice in memory while it is written (tensors + serialised bytes), so keep it
# well below host memory; Hugging Face's own default is 5 GB.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# The stacked routed-expert tensors: the ones expert parallelism splits along dim 0 (experts).
_EXPERT_STACK = re.compile(r"\.mlp\.experts\.(?:gate_up_proj|down_proj)$")
_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


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
            # streamed tensor by tensor (one converted tensor at a time, never a shard's bytes twice);
            # the staging folder is only committed once every file is complete
            entries = [(slot.release_key, slot.of(state)) for slot in shard]
            total += write_safetensors(staging / name, entries, target)
            weight_map.update(dict.fromkeys((key for key, _ in entries), name))
        model.config.to_json(staging / CONFIG_NAME, torch_dtype=saved_dtype_name(state.values(), target))
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


# ---- expert-parallel saving: each rank writes its own shards of one checkpoint -----------------------

@dataclass(frozen=True)
class ShardFile:
    """One `model-0000i-of-0000n.safetensors` file of a checkpoint: the EP rank that writes it and
    the release tensors it holds, in layout order."""

    name: str
    writer: int
    slots: tuple[TensorSlot, ...]


def is_expert_stack(key: str) -> bool:
    """A stacked routed-expert tensor ([experts, ...]): split along dim 0 by expert parallelism."""
    return _EXPERT_STACK.search(key) is not None


def expert_parallel_shards(local: Mapping[str, Tensor], ep: int, *, tie_word_embeddings: bool = False,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           dtype: torch.dtype | str | None = None) -> list[ShardFile]:
    """The files of the checkpoint that `ep` expert-parallel ranks write together, computed from one
    rank's state dict (`local`: stacked expert tensors hold this rank's 1/ep of the experts; only
    shapes are read, so every rank gets the same list without exchanging anything).

    Expert e's tensors go to a file of EP rank e // (experts / ep); every other tensor to EP rank
    0. Each writer's tensors are split greedily in layout order like `save_pretrained`'s, writer 0's
    files first: with ep=1 the plan is exactly `save_pretrained`'s."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise bad_value("max_shard_bytes", max_shard_bytes, "must be a positive integer")
    if not isinstance(ep, int) or ep < 1:
        raise bad_value("expert_parallel", ep, "must be a positive integer")
    target = resolve_dtype(dtype)
    whole = {k: torch.empty((t.shape[0] * ep, *t.shape[1:]) if is_expert_stack(k) else t.shape, dtype=t.dtype,
                            device="meta") for k, t in local.items()}
    layout = release_layout(whole, tie_word_embeddings=tie_word_embeddings)
    groups: list[list[list[TensorSlot]]] = []
    for writer in range(ep):
        mine = [slot for slot in layout if _writer_of(slot, local) == writer]
        groups.append(_split_into_shards(mine, whole, target, max_shard_bytes) if mine else [])
    count = sum(len(g) for g in groups)
    names = iter(f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))
    return [ShardFile(next(names), writer, tuple(shard)) for writer, group in enumerate(groups) for shard in group]


def _writer_of(slot: TensorSlot, local: Mapping[str, Tensor]) -> int:
    if not is_expert_stack(slot.key):
        return 0
    return slot.index[0] // local[slot.key].shape[0]


def _local_tensor(slot: TensorSlot, local: Mapping[str, Tensor]) -> Tensor:
    """The release tensor `slot` from the rank that owns it (its expert index made local)."""
    if not is_expert_stack(slot.key):
        return slot.of(local)
    rows = local[slot.key].shape[0]
    return local[slot.key][(slot.index[0] % rows, *slot.index[1:])]


def save_expert_parallel_part(model: PanguProMoEForCausalLM, directory: str | Path, *, ep: int, ep_rank: int,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                              dtype: torch.dtype | str | None = None) -> list[str]:
    """Write EP rank `ep_rank`'s files of the checkpoint `ep` ranks save together into `directory`
    (see `expert_parallel_shards`); EP rank 0 also writes config.json and
    `model.safetensors.index.json` for every rank's files. Returns the names written.

    `model` is this rank's expert-parallel shard (parameter names of the whole model). Nothing is
    committed here: `directory` is a staging directory that the caller renames into place once every
    rank has finished. Tensors are streamed to the file one at a time, so this rank holds nothing
    beyond its own parameters and the tensor being written (plus its dtype conversion, if any)."""
    if not isinstance(ep_rank, int) or not 0 <= ep_rank < ep:
        raise bad_value("ep_rank", ep_rank, f"must be in [0, {ep})")
    target = resolve_dtype(dtype)
    local = model.state_dict()
    meta = [k for k, t in local.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save a model with tensors on the meta device ({listing(meta)}); "
                         f"load or initialise its weights first")
    shards = expert_parallel_shards(local, ep, tie_word_embeddings=model.config.tie_word_embeddings,
                                    max_shard_bytes=max_shard_bytes, dtype=target)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in shards:
        if shard.writer == ep_rank:
            write_safetensors(directory / shard.name,
                              ((slot.release_key, _local_tensor(slot, local)) for slot in shard.slots), target)
            written.append(shard.name)
    if ep_rank == 0:
        model.config.to_json(directory / CONFIG_NAME, torch_dtype=saved_dtype_name(local.values(), target))
        atomic_write_text(directory / INDEX_NAME, index_text(shards, local, ep, target))
        written += [CONFIG_NAME, INDEX_NAME]
    return written


def index_text(shards: list[ShardFile], local: Mapping[str, Tensor], ep: int, target: torch.dtype | None) -> str:
    """`model.safetensors.index.json` for `shards`: every key's file and the bytes of all tensors,
    from shapes alone."""
    weight_map, total = {}, 0
    for shard in shards:
        for slot in shard.slots:
            t = _local_tensor(slot, local)
            total += t.numel() * torch.empty((), dtype=_file_dtype(t, target)).element_size()
            weight_map[slot.release_key] = shard.name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def _file_dtype(t: Tensor, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and t.is_floating_point() else t.dtype


def write_safetensors(path: Path, tensors: Iterable[tuple[str, Tensor]], target: torch.dtype | None = None) -> int:
    """A safetensors file written tensor by tensor: the header is computed from shapes, then each
    tensor is converted (`target` for floating tensors), copied to the CPU if needed and appended,
    so only one converted tensor exists at a time. Readable by `safe_open` and transformers alike.
    Returns the bytes of tensor data written."""
    entries = list(tensors)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in entries:
        dtype = _file_dtype(t, target)
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{key}: dtype {dtype} has no safetensors name")
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for _, t in entries:
            data = t.detach().to(device="cpu", dtype=_file_dtype(t, target)).contiguous()
            fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
            del data
        fh.flush()
        os.fsync(fh.fileno())
    return offset
