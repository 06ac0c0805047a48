"""Checkpoint merging (the paper's SFT recipe), two levels of grouping:

    Theta_merged = Theta_base + sum_k lambda_k * mean_i (Theta_k^i - Theta_base)

Group k holds N_k checkpoints (e.g. one epoch's, or one stretch of an SFT run); lambda_k weighs that
group's mean update. `merge_checkpoints` streams: it reads one tensor at a time from each
checkpoint's safetensors shards (plain reads at the header's offsets, no memory map whose pages
would stay resident), computes the merged tensor in fp32 and appends it to the output shard, so the
peak memory is a few tensors whatever the checkpoint's size. The output has the base's shard files,
keys, dtypes, config.json and tokenizer files; it is written to a staging directory and renamed into
place only when complete, and every check (keys, shapes, configs) runs before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from moge.checkpoint.files import _SAFETENSORS_DTYPES, CONFIG_NAME, INDEX_NAME, Source, read_config
from moge.errors import CheckpointError, ConfigError

_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items() if v is not None}
# files beside the weights that the merged checkpoint takes from the base
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def merge_state_dicts(base: Mapping[str, Tensor], groups: Sequence[Sequence[Mapping[str, Tensor]]],
                      lambdas: Sequence[float]) -> dict[str, Tensor]:
    """The merge formula over in-memory state dicts with identical keys and shapes (base dtype kept)."""
    _check_groups(groups, lambdas)
    for k, group in enumerate(groups):
        for i, sd in enumerate(group):
            if set(sd) != set(base):
                missing, extra = sorted(set(base) - set(sd)), sorted(set(sd) - set(base))
                raise CheckpointError(f"group {k} checkpoint {i} does not match the base: missing {missing[:5]}, "
                                      f"unexpected {extra[:5]}")
            for key, t in sd.items():
                if t.shape != base[key].shape:
                    raise CheckpointError(f"group {k} checkpoint {i}: {key} has shape {tuple(t.shape)}, "
                                          f"base has {tuple(base[key].shape)}")
    return {key: merge_tensor(b, [[sd[key] for sd in group] for group in groups], lambdas)
            for key, b in base.items()}


def merge_tensor(base: Tensor, groups: Sequence[Sequence[Tensor]], lambdas: Sequence[float]) -> Tensor:
    """One tensor of the formula, in fp32, returned in the base's dtype; integer tensors are the base's."""
    if not base.is_floating_point():
        return base.clone()
    b32 = base.float()
    acc = b32.clone()
    for lam, group in zip(lambdas, groups, strict=True):
        delta = torch.zeros_like(b32)
        for t in group:
            delta += t.float() - b32
        acc += (lam / len(group)) * delta
    return acc.to(base.dtype)


def _check_groups(groups: Sequence[Sequence], lambdas: Sequence[float]) -> None:
    if len(groups) != len(lambdas):
        raise ConfigError(f"got {len(groups)} checkpoint groups but {len(lambdas)} lambdas: give one lambda per group")
    if not groups or any(len(g) == 0 for g in groups):
        raise ConfigError("every checkpoint group needs at least one checkpoint")


class _Reader:
    """Tensors of one safetensors file, read on demand with plain file reads."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            try:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        self.data_start = 8 + n
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def read(self, key: str) -> Tensor:
        e = self.entries[key]
        dtype = _SAFETENSORS_DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: {key} has dtype {e['dtype']}, which cannot be merged")
        start, end = e["data_offsets"]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + start)
            if fh.readinto(memoryview(raw.numpy())) != end - start:
                raise CheckpointError(f"{self.path} is truncated: {key} runs past the end of the file")
        return raw.view(dtype).reshape(e["shape"])


class _Checkpoint:
    """A released-layout checkpoint directory: which file holds each key, with its reader."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        source = Source.open(self.directory)  # checks the index against the files' headers
        self.found = source.found
        self.files = source.files
        self._readers: dict[str, _Reader] = {}
        self.file_of = {key: name for name, keys in source.files.items() for key in keys}

    def read(self, key: str) -> Tensor:
        name = self.file_of[key]
        if name not in self._readers:
            self._readers[name] = _Reader(self.directory / name)
        return self._readers[name].read(key)


def merge_checkpoints(base: str | Path, groups: Sequence[Sequence[str | Path]], lambdas: Sequence[float],
                      out: str | Path) -> Path:
    """Merge released-layout (float) checkpoints tensor by tensor into `out`; returns `out`."""
    _check_groups(groups, lambdas)
    lambdas = [float(x) for x in lambdas]
    b = _Checkpoint(base)
    ckpts = [[_Checkpoint(p) for p in g] for g in groups]
    for k, group in enumerate(ckpts):
        for i, c in enumerate(group):
            where = f"group {k} checkpoint {i} ({c.directory})"
            if c.config != b.config:
                raise ConfigError(f"checkpoint {c.directory} has a different model config from the base {base}; "
                                  "only checkpoints of one architecture can be merged")
            if set(c.found) != set(b.found):
                missing, extra = sorted(set(b.found) - set(c.found)), sorted(set(c.found) - set(b.found))
                raise CheckpointError(f"{where} does not match the base: missing {missing[:5]}, "
                                      f"unexpected {extra[:5]}")
            for key, (shape, _) in c.found.items():
                if shape != b.found[key][0]:
                    raise CheckpointError(f"{where}: {key} has shape {shape}, base has {b.found[key][0]}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file; give a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merge-"))
    try:
        for name, keys in b.files.items():
            _write_merged(staging / name, b, ckpts, lambdas, keys)
        for extra in (CONFIG_NAME, INDEX_NAME, *TOKENIZER_FILES):
            if (b.directory / extra).is_file():
                shutil.copy2(b.directory / extra, staging / extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_merged(path: Path, base: _Checkpoint, groups: list[list[_Checkpoint]], lambdas: list[float],
                  keys: list[str]) -> None:
    """One output shard with the base's keys and dtypes: the header from shapes, then each merged
    tensor appended as soon as it is computed (one merged tensor in memory at a time)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        shape, dtype = base.found[key]
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for key in keys:
            b = base.read(key)
            if not b.is_floating_point():
                merged = b
            else:
                b32 = b.float()
                acc = b32.clone()
                for lam, group in zip(lambdas, groups):
                    for c in group:  # acc += lam / N_k * (theta - base), one checkpoint's tensor at a time
                        acc.add_(c.read(key).float() - b32, alpha=lam / len(group))
                merged = acc.to(b.dtype)
                del acc, b32
            fh.write(memoryview(merged.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del merged, b
        fh.flush()
        os.fsync(fh.fileno())

