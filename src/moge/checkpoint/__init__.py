"""Checkpoints in the released Hugging Face layout: config.json, safetensors shards and an index.

Our model keeps the routed experts stacked (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj`
[E, D, F]) and the router's weights under `mlp.router.*`, so one grouped kernel can run all experts.
The release stores one gate/up/down matrix per expert and the router as `mlp.gate.weight` and
`mlp.router_scale`. This module is the only place that knows both: `release_layout` lists, for every
release tensor, which slice of which of our tensors it is, and saving, loading and the conversion
helpers all walk that one list.

Loading builds the model on the meta device and copies each file tensor straight into its slot of a
preallocated tensor, one shard open at a time: peak memory is one copy of the weights plus the
tensor being read. Every problem with the files (missing, unexpected or misshapen keys, a shard the
index names but that is absent, a truncated or corrupted file, a bad config.json) raises
`CheckpointError` naming the key or file. Pickle files (`*.bin`, `*.pt`, `*.pth`) can run code when
loaded, so they are refused unless the caller opts in, and even then read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from moge.config import ModelConfig
from moge.io import atomic_write_bytes, atomic_write_text
from moge.nn.moe import MoGEBlock
from moge.nn.model import PanguProMoEForCausalLM
from moge.nn.routing import Router

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# A shard is held twice in memory while it is written (tensors + serialised bytes), so keep it
# well below host memory; Hugging Face's own default is 5 GB.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_STACKED = re.compile(r"^(model\.(?:layers|mtp)\.\d+\.mlp)\.(router\.gate\.weight|router\.router_scale|"
                      r"experts\.gate_up_proj|experts\.down_proj)$")
# Keys some exporters write that carry nothing the config does not already fix.
_IGNORABLE = re.compile(r"\.rotary_emb\.inv_freq$")
# Our own extra state: absent from the release, so a checkpoint may lack it (it keeps its init value).
_OPTIONAL = re.compile(r"\.mlp\.router\.expert_bias$")

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class CheckpointError(ValueError):
    """The files on disk do not form a checkpoint this model can load; the message says which."""


# ---------------------------------------------------------------------------------------------
# The layout mapping
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSlot:
    """One release tensor: `state_dict[key][index]` of our model (index () = the whole tensor)."""

    release_key: str
    key: str
    index: tuple = ()

    def of(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return tensors[self.key][self.index]


def release_layout(state_dict: Mapping[str, Tensor], *, tie_word_embeddings: bool = False) -> list[TensorSlot]:
    """Every release tensor of a model with this state dict, in save order.

    Experts come out per expert (gate, up, down for expert 0, then expert 1, ...) at the place of
    the stacked tensors; keys the release shares with us (attention, norms, shared expert, our
    extra `router.expert_bias`) map to themselves. With tied embeddings `lm_head.weight` is left
    out, as Hugging Face does. Works on meta tensors (only shapes are read)."""
    slots: list[TensorSlot] = []
    for key, tensor in state_dict.items():
        if tie_word_embeddings and key == "lm_head.weight":
            continue
        m = _STACKED.match(key)
        if m is None:
            slots.append(TensorSlot(key, key))
            continue
        prefix, part = m.groups()
        if part == "router.gate.weight":
            slots.append(TensorSlot(f"{prefix}.gate.weight", key))
        elif part == "router.router_scale":
            slots.append(TensorSlot(f"{prefix}.router_scale", key))
        elif part == "experts.gate_up_proj":
            down_key = f"{prefix}.experts.down_proj"
            if down_key not in state_dict:
                raise KeyError(f"state dict has {key} but not {down_key}: the stacked experts need both")
            num_experts, two_f = tensor.shape[0], tensor.shape[1]
            f = two_f // 2
            for e in range(num_experts):
                base = f"{prefix}.experts.{e}"
                slots += [TensorSlot(f"{base}.gate_proj.weight", key, (e, slice(0, f))),
                          TensorSlot(f"{base}.up_proj.weight", key, (e, slice(f, two_f))),
                          TensorSlot(f"{base}.down_proj.weight", down_key, (e,))]
        # experts.down_proj was emitted together with gate_up_proj
    return slots


def release_state_dict(model: PanguProMoEForCausalLM) -> dict[str, Tensor]:
    """The model's weights under the release's key names and shapes (views, no copies)."""
    state = model.state_dict()
    layout = release_layout(state, tie_word_embeddings=model.config.tie_word_embeddings)
    return {slot.release_key: slot.of(state) for slot in layout}


def from_release_state_dict(tensors: Mapping[str, Tensor],
                            model_or_config: PanguProMoEForCausalLM | ModelConfig) -> dict[str, Tensor]:
    """Our state dict (stacked experts) from release-layout tensors, validated against the model.

    Each stacked tensor takes the dtype of its first piece. With tied embeddings the result has
    `lm_head.weight` as the same tensor as `model.embed_tokens.weight`."""
    model = _meta_model(model_or_config) if isinstance(model_or_config, ModelConfig) else model_or_config
    found = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    plan = _Plan.of(model, found, where="the given tensors")
    out = plan.allocate(dtype=None, device="cpu")
    plan.fill(out, ((k, tensors[k]) for k in tensors))
    return out


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


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
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is invalid: must be a positive integer")
    target = resolve_dtype(dtype)
    state = model.state_dict() if state_dict is None else dict(state_dict)
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save a model with tensors on the meta device ({_listing(meta)}); "
                         f"load or initialise its weights first")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"checkpoint directory={str(directory)!r} is a file; give a directory path")
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
                   if isinstance(n, str) and _is_plain_name(n)}
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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_pretrained(directory: str | Path, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu", allow_pickle: bool = False) -> PanguProMoEForCausalLM:
    """Build the model from `directory/config.json` and load its weights.

    `dtype` (bf16, fp16, fp32; default: each tensor's dtype in the files) converts floating-point
    weights while they are copied in. The model is built on the meta device and each weight is
    allocated once, on `device`, and filled shard by shard. Routers whose checkpoint holds our
    `router.expert_bias` are built with the aux-loss-free bias so it has a place to go.
    `allow_pickle=True` permits `*.bin` / `*.pt` / `*.pth` weights (read with weights_only=True)
    when the directory has no safetensors. A W8A8 checkpoint (config.json with a
    `quantization_config`, written by `moge quantize`) loads through `moge.quant.load_quantized`."""
    directory = Path(directory)
    target = resolve_dtype(dtype)
    cfg = read_config(directory)
    if "quantization_config" in cfg.extra:
        from moge.checkpoint.quantized import load_quantized

        return load_quantized(directory, dtype=target, device=device)
    source = _Source.open(directory, allow_pickle=allow_pickle)
    model = _meta_model(cfg)
    _add_expert_bias_where_saved(model, source.found)
    plan = _Plan.of(model, source.found, where=str(directory))
    tensors = plan.allocate(dtype=target, device=device)
    plan.fill(tensors, source.tensors())
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _rebuild_non_persistent_buffers(model, torch.device(device))
    return model


def load_state_dict_into(model: nn.Module, directory: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """Copy a checkpoint's weights into an existing, materialised model, in place.

    Each parameter keeps its dtype and device (values are converted while copied), so optimizer
    references stay valid. A checkpoint without `router.expert_bias` leaves the model's bias as
    it is. For a model on the meta device use `load_pretrained`."""
    state = model.state_dict()
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"model has tensors on the meta device ({_listing(meta)}): use load_pretrained, "
                         f"or materialise the model (to_empty) before loading into it")
    directory = Path(directory)
    source = _Source.open(directory, allow_pickle=allow_pickle)
    plan = _Plan.of(model, source.found, where=str(directory))
    with torch.no_grad():
        plan.fill(state, source.tensors())
    return model


def read_config(directory: str | Path) -> ModelConfig:
    """`directory/config.json` as a ModelConfig, with errors that name the file."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist or is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint directory needs the model's config.json")
    try:
        return ModelConfig.from_json(path)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid model config: {e}") from None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a floating torch dtype, or one of the names bf16/bfloat16, fp16/float16/half, fp32/float32."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    elif dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise ValueError(f"dtype={dtype!r} is invalid: choose one of {sorted(_DTYPE_NAMES)} or "
                     f"torch.float32 / torch.bfloat16 / torch.float16 (or None to keep the files' dtype)")


def _meta_model(cfg: ModelConfig) -> PanguProMoEForCausalLM:
    with torch.device("meta"):
        return PanguProMoEForCausalLM(cfg)


def _add_expert_bias_where_saved(model: PanguProMoEForCausalLM, found: Mapping[str, object]) -> None:
    """config.json cannot say a router has the aux-loss-free bias; the saved bias says it."""
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        if (isinstance(block, MoGEBlock) and block.router.expert_bias is None
                and f"model.layers.{i}.mlp.router.expert_bias" in found):
            block.cfg = replace(block.cfg, aux_free_bias=True)
            with torch.device("meta"):
                block.router = Router(block.cfg)


def _rebuild_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
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
        raise CheckpointError(f"tensors still on the meta device after loading: {_listing(left)}")


@dataclass
class _Plan:
    """Which file tensor fills which slot of which model tensor, validated against the files."""

    state: dict[str, Tensor]  # the model's state dict (may be meta)
    slots: dict[str, TensorSlot]  # release key -> slot, for keys present in the files
    found: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]
    tied: bool

    @classmethod
    def of(cls, model: nn.Module, found: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]],
           where: str) -> "_Plan":
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        state = model.state_dict()
        layout = release_layout(state, tie_word_embeddings=tied)
        expected = {s.release_key: s for s in layout}
        problems: list[str] = []
        missing = [k for k in expected if k not in found and not _OPTIONAL.search(k)]
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        unexpected = [k for k in found if k not in expected and not _IGNORABLE.search(k)
                      and not (tied and k == "lm_head.weight")]
        if unexpected:
            hint = ""
            if any(_OPTIONAL.search(k) for k in unexpected):
                hint = " (router.expert_bias needs routers built with aux_free_bias=True)"
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}{hint}")
        bad_shapes = []
        for key, slot in expected.items():
            if key in found:
                want, (shape, dtype) = tuple(slot.of(state).shape), found[key]
                if shape != want:
                    bad_shapes.append(f"{key}: expected shape {list(want)}, found {list(shape)}")
                elif dtype is None or not dtype.is_floating_point:
                    bad_shapes.append(f"{key}: expected a floating-point dtype, found {dtype}")
        if bad_shapes:
            problems.append(f"shape/dtype mismatches ({len(bad_shapes)}): " + "; ".join(bad_shapes[:10])
                            + (f"; ... and {len(bad_shapes) - 10} more" if len(bad_shapes) > 10 else ""))
        if problems:
            raise CheckpointError(f"checkpoint {where} does not match the model:\n  " + "\n  ".join(problems))
        return cls(state, {k: s for k, s in expected.items() if k in found}, found, tied)

    def allocate(self, dtype: torch.dtype | None, device: torch.device | str) -> dict[str, Tensor]:
        """Empty tensors for the whole state dict: `dtype` for floating tensors, else the dtype of
        the first file tensor that lands in each (optional tensors the files lack: their init value,
        zeros)."""
        first: dict[str, str] = {}
        for release_key, slot in self.slots.items():
            first.setdefault(slot.key, release_key)
        out: dict[str, Tensor] = {}
        for key, t in self.state.items():
            if self.tied and key == "lm_head.weight":
                continue
            if key not in first:  # optional, absent from the files
                out[key] = torch.zeros(t.shape, dtype=dtype or t.dtype, device=device)
                continue
            file_dtype = self.found[first[key]][1]
            out[key] = torch.empty(t.shape, dtype=dtype if dtype is not None else file_dtype, device=device)
        if self.tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    def fill(self, tensors: Mapping[str, Tensor], source: Iterator[tuple[str, Tensor]]) -> None:
        with torch.no_grad():
            for release_key, value in source:
                slot = self.slots.get(release_key)
                if slot is not None:
                    slot.of(tensors).copy_(value)


@dataclass
class _Source:
    """The weight files of a checkpoint directory: which keys each holds, with shapes and dtypes
    read from the file headers, and a reader that opens one file at a time."""

    directory: Path
    files: dict[str, list[str]]  # file name -> release keys in it
    found: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    pickle: bool = False

    @classmethod
    def open(cls, directory: Path, allow_pickle: bool) -> "_Source":
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist or is not a directory")
        if (directory / INDEX_NAME).exists():
            return cls._from_index(directory, directory / INDEX_NAME, pickle=False)
        if (directory / SINGLE_FILE_NAME).exists():
            return cls._from_files(directory, [SINGLE_FILE_NAME], pickle=False)
        safetensors_files = sorted(p.name for p in directory.glob("*.safetensors"))
        if safetensors_files:
            raise CheckpointError(f"{directory} has {_listing(safetensors_files)} but no {INDEX_NAME} "
                                  f"(or single {SINGLE_FILE_NAME}) saying which tensors they hold")
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles and not (directory / PICKLE_INDEX_NAME).exists():
            raise CheckpointError(f"{directory} holds no weights: expected {INDEX_NAME} with its "
                                  f"*.safetensors shards, or {SINGLE_FILE_NAME}")
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} has only pickle weight files ({_listing(pickles or [PICKLE_INDEX_NAME])}); "
                f"unpickling can run arbitrary code, so they are refused. Convert them to safetensors, "
                f"or pass allow_pickle=True to read them with torch.load(weights_only=True)")
        if (directory / PICKLE_INDEX_NAME).exists():
            return cls._from_index(directory, directory / PICKLE_INDEX_NAME, pickle=True)
        if len(pickles) != 1:
            raise CheckpointError(f"{directory} has several pickle weight files ({_listing(pickles)}) and no "
                                  f"{PICKLE_INDEX_NAME} saying which tensors each holds")
        return cls._from_files(directory, pickles, pickle=True)

    @classmethod
    def _from_index(cls, directory: Path, index_path: Path, pickle: bool) -> "_Source":
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
        bad = [n for n in files if not _is_plain_name(n)]
        if bad:
            raise CheckpointError(f"{index_path} names files outside the checkpoint directory: {_listing(bad)}; "
                                  f"entries must be plain file names")
        absent = [f"{n} ({len(files[n])} tensors)" for n in sorted(files) if not (directory / n).is_file()]
        if absent:
            raise CheckpointError(f"{index_path} names shard files that do not exist in {directory}: "
                                  f"{_listing(absent)}")
        source = cls._from_files(directory, sorted(files), pickle)
        stray = []
        for name in sorted(files):
            in_file = set(source.files[name])
            not_there = [k for k in files[name] if k not in in_file]
            if not_there:
                raise CheckpointError(f"{index_path} lists keys in {name} that the file does not hold: "
                                      f"{_listing(not_there)}")
            stray += [f"{k} (in {name})" for k in source.files[name] if k not in set(files[name])]
        if stray:
            raise CheckpointError(f"shard files hold tensors that {index_path.name} does not list: {_listing(stray)}")
        return source

    @classmethod
    def _from_files(cls, directory: Path, names: list[str], pickle: bool) -> "_Source":
        files: dict[str, list[str]] = {}
        found: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        for name in names:
            headers = _pickle_headers(directory / name) if pickle else _safetensors_headers(directory / name)
            twice = [k for k in headers if k in found]
            if twice:
                raise CheckpointError(f"{name} repeats tensors already found in another file: {_listing(twice)}")
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
            try:
                handle = safe_open(path, framework="pt", device="cpu")
            except Exception as e:  # the Rust errors have no stable Python type across versions
                raise _corrupt(path, e) from None
            with handle as f:
                for key in keys:
                    try:
                        value = f.get_tensor(key)
                    except Exception as e:
                        raise _corrupt(path, e) from None
                    yield key, value


def _safetensors_headers(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Shapes and dtypes from the header; safetensors also checks that the data covers the file."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(piece.get_dtype()))
            return out
    except Exception as e:  # SafetensorError, OSError: the message says which
        raise _corrupt(path, e) from None


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated or "
                           f"corrupted: copy or save it again")


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a tensor-only torch file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path} must hold a dict of tensor names to tensors, got {type(data).__name__}")
    return data


def _pickle_headers(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in _torch_load(path).items()}


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
