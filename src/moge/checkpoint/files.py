"""What a checkpoint directory holds and how to read it, before any model is involved.

`Source.open` finds the weight files (a safetensors index and its shards, a single
`model.safetensors`, or - only if the caller opts in - pickle files), reads every tensor's shape and
dtype from the file headers, and checks that the index and the files agree. `Source.tensors` then
streams the tensors one file at a time. Every problem names the file or key: a missing file raises
`MissingCheckpointFileError` (both a `CheckpointError` and a `FileNotFoundError`), anything else
`CheckpointError`. Pickle files can run code when loaded, so they are refused unless allowed, and
even then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from moge.config import ModelConfig
from moge.errors import CheckpointError, MissingFileError

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}

# key -> (shape, dtype) as the file headers give them; dtype None for a type torch lacks.
Headers = dict[str, tuple[tuple[int, ...], torch.dtype | None]]


class MissingCheckpointFileError(CheckpointError, MissingFileError):
    """A checkpoint directory, its config.json or a weight file it names does not exist."""


def read_config(directory: str | Path) -> ModelConfig:
    """`directory/config.json` as a ModelConfig, with errors that name the file."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise MissingCheckpointFileError(f"checkpoint directory {str(directory)!r} does not exist or is not a "
                                         f"directory")
    if not path.is_file():
        raise MissingCheckpointFileError(f"{path} is missing: a checkpoint directory needs the model's config.json")
    try:
        return ModelConfig.from_json(path)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid model config: {e}") from None


@dataclass
class Source:
    """The weight files of a checkpoint directory: which keys each holds, with shapes and dtypes
    read from the file headers, and a reader that opens one file at a time."""

    directory: Path
    files: dict[str, list[str]]  # file name -> keys in it
    found: Headers
    pickle: bool = False

    @classmethod
    def open(cls, directory: str | Path, allow_pickle: bool = False) -> Source:
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingCheckpointFileError(f"checkpoint directory {str(directory)!r} does not exist or is not a "
                                             f"directory")
        if (directory / INDEX_NAME).exists():
            return cls._from_index(directory, directory / INDEX_NAME, pickle=False)
        if (directory / SINGLE_FILE_NAME).exists():
            return cls._from_files(directory, [SINGLE_FILE_NAME], pickle=False)
        safetensors_files = sorted(p.name for p in directory.glob("*.safetensors"))
        if safetensors_files:
            raise CheckpointError(f"{directory} has {listing(safetensors_files)} but no {INDEX_NAME} "
                                  f"(or single {SINGLE_FILE_NAME}) saying which tensors they hold")
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles and not (directory / PICKLE_INDEX_NAME).exists():
            raise MissingCheckpointFileError(f"{directory} holds no weights: expected {INDEX_NAME} with its "
                                             f"*.safetensors shards, or {SINGLE_FILE_NAME}")
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} has only pickle weight files ({listing(pickles or [PICKLE_INDEX_NAME])}); "
                f"unpickling can run arbitrary code, so they are refused. Convert them to safetensors, "
                f"or pass allow_pickle=True to read them with torch.load(weights_only=True)")
        if (directory / PICKLE_INDEX_NAME).exists():
            return cls._from_index(directory, directory / PICKLE_INDEX_NAME, pickle=True)
        if len(pickles) != 1:
            raise CheckpointError(f"{directory} has several pickle weight files ({listing(pickles)}) and no "
                                  f"{PICKLE_INDEX_NAME} saying which tensors each holds")
        return cls._from_files(directory, pickles, pickle=True)

    @classmethod
    def _from_index(cls, directory: Path, index_path: Path, pickle: bool) -> Source:
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_path} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path} needs a 'weight_map' object mapping tensor names to file names")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        bad = [n for n in files if not is_plain_name(n)]
        if bad:
            raise CheckpointError(f"{index_path} names files outside the checkpoint directory: {listing(bad)}; "
                                  f"entries must be plain file names")
        absent = [f"{n} ({len(files[n])} tensors)" for n in sorted(files) if not (directory / n).is_file()]
        if absent:
            raise MissingCheckpointFileError(f"{index_path} names shard files that do not exist in {directory}: "
                                             f"{listing(absent)}")
        source = cls._from_files(directory, sorted(files), pickle)
        stray = []
        for name in sorted(files):
            in_file = set(source.files[name])
            not_there = [k for k in files[name] if k not in in_file]
            if not_there:
                raise CheckpointError(f"{index_path} lists keys in {name} that the file does not hold: "
                                      f"{listing(not_there)}")
            stray += [f"{k} (in {name})" for k in source.files[name] if k not in set(files[name])]
        if stray:
            raise CheckpointError(f"shard files hold tensors that {index_path.name} does not list: {listing(stray)}")
        return source

    @classmethod
    def _from_files(cls, directory: Path, names: list[str], pickle: bool) -> Source:
        files: dict[str, list[str]] = {}
        found: Headers = {}
        for name in names:
            headers = _pickle_headers(directory / name) if pickle else safetensors_headers(directory / name)
            twice = [k for k in headers if k in found]
            if twice:
                raise CheckpointError(f"{name} repeats tensors already found in another file: {listing(twice)}")
            files[name] = list(headers)
            found.update(headers)
        return cls(directory, files, found, pickle)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor, file by file; only one file is open at a time."""
        for name, keys in self.files.items():
            path = self.directory / name
            if self.pickle:
                data = _torch_load(path)
                for key in keys:
                    yield key, data[key]
                del data
                continue
            yield from read_safetensors(path, keys)


def read_safetensors(path: Path, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    """`keys` of one safetensors file, in order; a damaged file raises CheckpointError naming it."""
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - the Rust errors have no stable Python type across versions
        raise corrupt_file_error(path, e) from None
    with handle as f:
        for key in keys:
            try:
                value = f.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise corrupt_file_error(path, e) from None
            yield key, value


def safetensors_headers(path: Path) -> Headers:
    """Shapes and dtypes from the header; safetensors also checks that the data covers the file."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype()))
            return out
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the message says which
        raise corrupt_file_error(path, e) from None


def corrupt_file_error(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated or "
                           f"corrupted: copy or save it again")


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path} could not be read as a tensor-only torch file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path} must hold a dict of tensor names to tensors, got {type(data).__name__}")
    return data


def _pickle_headers(path: Path) -> Headers:
    return {k: (tuple(v.shape), v.dtype) for k, v in _torch_load(path).items()}


def is_plain_name(name: str) -> bool:
    """A file name inside the checkpoint directory (no path separators, not . or ..)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def listing(items: list[str], limit: int = 10, sep: str = ", ") -> str:
    """The first `limit` items, separated by `sep`, and how many more: keeps error messages readable."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... and {len(items) - limit} more" if len(items) > limit else "")
