"""Quantized checkpoints: config.json with a `quantization_config` entry, one model.safetensors.

Two methods share this format: W8A8 (`quant_method` moge-w8a8, moge.quant.int8) and weight-only
int8 / int4 (`quant_method` moge-weight-only with `scheme` int8-wo or int4-wo, the int4 group size
and symmetry recorded too; moge.quant.weight_only). Layout (our own; the release has no int8
format): the model's state dict under its own names, experts stacked as in memory. W8A8:
- a quantized linear `P` (e.g. model.layers.0.self_attn.q_proj): `P.weight` int8 [out, in],
  `P.weight_scale` fp32 [out], `P.bias` fp32 [out] when it has one;
- quantized experts `P` (model.layers.i.mlp.experts): `P.gate_up_proj` int8 [E, 2F, D],
  `P.gate_up_scale` fp32 [E, 2F], `P.down_proj` int8 [E, D, F], `P.down_scale` fp32 [E, D];
- everything else (embeddings, norms, router, lm_head) as in the float model.
Weight-only modules keep the same names (`P.weight`, `P.weight_scale`, `P.gate_up_proj`, ...) in the
scheme's layout: int4 weights packed two per uint8 byte [.., N, K/2] with scales [.., N, K/G] and,
asymmetric, zero points `P.weight_zero` / `P.gate_up_zero` / `P.down_zero` like the scales.
`quantization_config` names the scheme and lists the quantized modules, so loading rebuilds the
same structure before it reads a byte. Every mismatch (config field, missing, unexpected or
misshapen tensor, wrong dtype, scales that are not finite and positive, int8 values outside
-127..127, a truncated file) raises CheckpointError naming the field or tensor and the value.
The loader builds and completes its model with the same helpers as the float loader
(moge.checkpoint.build, moge.checkpoint.files); `moge.checkpoint.load_pretrained` picks between them.
`QuantizedCheckpoint` is the checked description of the files that both the whole loader here and
the sharded one (moge.checkpoint.partial, one rank's share through get_slice) start from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from moge.checkpoint.build import (add_expert_bias_where_saved, meta_model, rebuild_non_persistent_buffers,
                                   resolve_dtype, saved_dtype_name)
from moge.checkpoint.files import (
    CONFIG_NAME,
    INDEX_NAME,
    Headers,
    SINGLE_FILE_NAME,
    MissingCheckpointFileError,
    listing,
    read_config,
    read_safetensors,
    safetensors_headers,
)
from moge.config import ModelConfig
from moge.errors import CheckpointError, ConfigError
from moge.io import atomic_write_bytes, atomic_write_text
from moge.nn.experts import SwiGLUExperts
from moge.nn.model import PanguProMoEForCausalLM
from moge.quant.experts import QuantExperts
from moge.quant.int8 import QMAX, QuantLinear
from moge.quant.weight_only import INT4_BLOCK, WO_SCHEMES, WOExperts, WOLinear, check_group_size

QUANT_METHOD = "moge-w8a8"
WO_QUANT_METHOD = "moge-weight-only"
FORMAT_VERSION = 1
_SCALE_SUFFIXES = (".weight_scale", ".gate_up_scale", ".down_scale")
_LINEAR_TYPES = (QuantLinear, WOLinear)
_EXPERT_TYPES = (QuantExperts, WOExperts)


@dataclass(frozen=True)
class Scheme:
    """Which quantized modules a checkpoint holds: w8a8, or weight-only int8-wo / int4-wo."""

    name: str = "w8a8"
    group_size: int = 0  # int4-wo only
    symmetric: bool = True

    @property
    def signed_scales(self) -> bool:
        """Symmetric int4 scales carry the sign of each group's largest-magnitude weight (as q4_0)."""
        return self.name == "int4-wo" and self.symmetric

    def linear(self, m: nn.Linear) -> nn.Module:
        if self.name == "w8a8":
            return QuantLinear(m.in_features, m.out_features, m.bias is not None, device="meta")
        return WOLinear(m.in_features, m.out_features, m.bias is not None, scheme=self.name,
                        group_size=self.group_size or 32, symmetric=self.symmetric, device="meta")

    def experts(self, m: SwiGLUExperts) -> nn.Module:
        if self.name == "w8a8":
            return QuantExperts(m.num_experts, m.hidden_size, m.intermediate_size, device="meta")
        return WOExperts(m.num_experts, m.hidden_size, m.intermediate_size, scheme=self.name,
                         group_size=self.group_size or 32, symmetric=self.symmetric, device="meta")


def model_scheme(model: nn.Module) -> Scheme:
    """The scheme of a quantized model's modules (one scheme per model)."""
    found = set()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            found.add(Scheme())
        elif isinstance(m, (WOLinear, WOExperts)):
            found.add(Scheme(m.scheme, m.group_size if m.scheme == "int4-wo" else 0, m.symmetric))
    if len(found) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(found, key=str)}: save one scheme per model")
    if not found:
        raise ValueError("the model has no quantized modules: run moge.quant.quantize_model first")
    return found.pop()


def quantization_config(model: nn.Module, report: dict | None = None) -> dict:
    """The `quantization_config` entry of config.json for a quantized model."""
    scheme = model_scheme(model)
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES))
    experts = sorted(n for n, m in model.named_modules() if isinstance(m, _EXPERT_TYPES))
    if scheme.name != "w8a8":
        return _wo_config(scheme, linear, experts, report)
    out = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weights": {"dtype": "int8", "granularity": "per_output_channel", "symmetric": True, "scale_dtype": "float32"},
        "activations": {"dtype": "int8", "granularity": "per_token", "symmetric": True, "dynamic": True},
        "accumulation": "int32 (exact integer sums)",
        "modules": {"linear": linear, "experts": experts},
        "not_quantized": ["model.embed_tokens", "*norm", "mlp.router", "lm_head"],
    }
    if report:
        out["calibration"] = report
    return out


def _wo_config(scheme: Scheme, linear: list[str], experts: list[str], report: dict | None) -> dict:
    if scheme.name == "int8-wo":
        weights = {"dtype": "int8", "granularity": "per_output_channel", "symmetric": True, "scale_dtype": "float32"}
    else:
        weights = {"dtype": "int4", "granularity": "per_group", "group_size": scheme.group_size,
                   "symmetric": scheme.symmetric, "scale_dtype": "float32",
                   "packing": f"two 4-bit codes per uint8 byte in blocks of {INT4_BLOCK} along the input dim: "
                              f"byte j holds element j (low nibble) and j + {INT4_BLOCK // 2} (high nibble)",
                   "dequantize": "(code - 8) * scale" if scheme.symmetric else "code * scale + zero"}
    out = {"quant_method": WO_QUANT_METHOD, "format_version": FORMAT_VERSION, "scheme": scheme.name,
           "weights": weights, "activations": {"dtype": "float", "quantized": False},
           "modules": {"linear": linear, "experts": experts},
           "not_quantized": ["model.embed_tokens", "*norm", "mlp.router", "lm_head"]}
    if report:
        out["report"] = report
    return out


def save_quantized(model: nn.Module, directory: str | Path, *, report: dict | None = None) -> Path:
    """Write `directory/config.json` (with quantization_config) and `directory/model.safetensors`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"out directory={str(directory)!r} is a file; give a directory path")
    if (directory / INDEX_NAME).exists():
        raise ConfigError(f"{directory} holds a sharded float checkpoint ({INDEX_NAME}); write the quantized "
                          f"model to another directory")
    qc = quantization_config(model, report)
    cfg = model.config
    state = model.state_dict()
    tensors = {}
    for key, t in state.items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    directory.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes(tensors, metadata={"format": "pt", "quant_method": qc["quant_method"]})
    atomic_write_bytes(directory / SINGLE_FILE_NAME, data)
    hf = cfg.to_hf_dict(torch_dtype=saved_dtype_name(tensors.values()))
    hf["quantization_config"] = qc
    atomic_write_text(directory / CONFIG_NAME, json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return directory


def is_quantized_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_NAME
    try:
        return "quantization_config" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _field(qc: dict, path: str, want) -> None:
    value = qc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value != want:
        raise CheckpointError(f"quantization_config.{path}={value!r} is not supported: expected {want!r}")


def _check_wo(qc: dict, where: Path) -> Scheme:
    name = qc.get("scheme")
    if name not in WO_SCHEMES:
        raise CheckpointError(f"{where}: quantization_config.scheme={name!r} is not supported: expected one of "
                              f"{WO_SCHEMES}")
    _field(qc, "activations.quantized", False)
    if name == "int8-wo":
        _field(qc, "weights.dtype", "int8")
        _field(qc, "weights.granularity", "per_output_channel")
        return Scheme(name)
    _field(qc, "weights.dtype", "int4")
    _field(qc, "weights.granularity", "per_group")
    weights = qc.get("weights")
    group, sym = weights.get("group_size"), weights.get("symmetric")
    if not isinstance(sym, bool):
        raise CheckpointError(f"{where}: quantization_config.weights.symmetric={sym!r} is invalid: expected true "
                              f"or false")
    try:
        check_group_size(group, {})
    except ConfigError as e:
        raise CheckpointError(f"{where}: quantization_config.weights.{e}") from None
    return Scheme(name, group, sym)


def _check_config(qc, where: Path) -> tuple[list[str], list[str], Scheme]:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    if qc.get("quant_method") == WO_QUANT_METHOD:
        _field(qc, "format_version", FORMAT_VERSION)
        scheme = _check_wo(qc, where)
    else:
        _field(qc, "quant_method", QUANT_METHOD)
        _field(qc, "format_version", FORMAT_VERSION)
        _field(qc, "weights.dtype", "int8")
        _field(qc, "weights.granularity", "per_output_channel")
        _field(qc, "activations.dtype", "int8")
        _field(qc, "activations.granularity", "per_token")
        scheme = Scheme()
    modules = qc.get("modules")
    lists = []
    for kind in ("linear", "experts"):
        names = modules.get(kind) if isinstance(modules, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{where}: quantization_config.modules.{kind}={names!r} is invalid: expected a "
                                  f"list of module names")
        lists.append(names)
    return lists[0], lists[1], scheme


def _swap_modules(model: nn.Module, linear: list[str], experts: list[str], scheme: Scheme = Scheme()) -> None:
    """Replace the named float modules of a meta model with empty quantized ones."""
    modules = dict(model.named_modules())
    if scheme.name == "int4-wo":
        dims = {f"{n}.in_features": modules[n].in_features for n in linear if isinstance(modules.get(n), nn.Linear)}
        dims.update({f"{n}.{a}": getattr(modules[n], a) for n in experts if isinstance(modules.get(n), SwiGLUExperts)
                     for a in ("hidden_size", "intermediate_size")})
        try:
            check_group_size(scheme.group_size, dims)
        except ConfigError as e:
            raise CheckpointError(f"quantization_config.weights.{e}") from None
    for names, want, make in ((linear, nn.Linear, scheme.linear), (experts, SwiGLUExperts, scheme.experts)):
        for name in names:
            module = modules.get(name)
            if not isinstance(module, want):
                found = "no such module" if module is None else type(module).__name__
                raise CheckpointError(f"quantization_config lists {name!r} as a quantized {want.__name__}, but the "
                                      f"model built from config.json has {found} there")
            parent_name, _, attr = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, attr, make(module))


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A quantized checkpoint checked against its config.json before a byte of weights is read:
    its file, config, tensor headers, and which keys belong to quantized modules (int8 weights,
    fp32 scales and biases: their dtype is fixed, never converted). Shared by the whole loader
    below and the sharded one (moge.checkpoint.partial), so both accept and refuse the same files."""

    path: Path  # the single model.safetensors
    config: ModelConfig
    found: Headers
    quant_keys: frozenset[str]
    linear: tuple[str, ...]
    experts: tuple[str, ...]
    scheme: Scheme = Scheme()

    @classmethod
    def open(cls, directory: str | Path) -> QuantizedCheckpoint:
        directory = Path(directory)
        cfg = read_config(directory)
        linear, experts, scheme = _check_config(cfg.extra.get("quantization_config"), directory / CONFIG_NAME)
        path = directory / SINGLE_FILE_NAME
        if not path.is_file():
            raise MissingCheckpointFileError(f"{path} is missing: a quantized checkpoint keeps its weights in "
                                             f"{SINGLE_FILE_NAME}")
        found = safetensors_headers(path)
        out = cls(path, cfg, found, frozenset(), tuple(linear), tuple(experts), scheme)
        model = out.meta_model()
        expected = out.expected(model)
        problems = []
        missing = [k for k in expected if k not in found]
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {listing(missing)}")
        unexpected = [k for k in found if k not in expected]
        if unexpected:
            problems.append(f"unexpected tensors ({len(unexpected)}): {listing(unexpected)}")
        bad = []
        quant_keys = set()
        for key, t in expected.items():
            if key not in found:
                continue
            shape, file_dtype = found[key]
            if shape != tuple(t.shape):
                bad.append(f"{key}: expected shape {list(t.shape)}, found {list(shape)}")
            elif t.dtype in (torch.int8, torch.uint8, torch.float32) and _is_quant_tensor(key, t, model):
                quant_keys.add(key)
                if file_dtype != t.dtype:
                    bad.append(f"{key}: expected dtype {t.dtype}, found {file_dtype}")
            elif file_dtype is None or not file_dtype.is_floating_point:
                bad.append(f"{key}: expected a floating-point dtype, found {file_dtype}")
        if bad:
            problems.append(f"shape/dtype mismatches ({len(bad)}): {listing(bad, sep='; ')}")
        if problems:
            raise CheckpointError(f"quantized checkpoint {directory} does not match its config:\n  "
                                  + "\n  ".join(problems))
        return replace(out, quant_keys=frozenset(quant_keys))

    def meta_model(self) -> PanguProMoEForCausalLM:
        """The model these files fill, on the meta device: quantized modules where
        quantization_config lists them, an aux-loss-free router wherever a bias is saved."""
        model = meta_model(self.config)
        add_expert_bias_where_saved(model, self.found)
        _swap_modules(model, list(self.linear), list(self.experts), self.scheme)
        return model

    def expected(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state dict as the file holds it (a tied lm_head is not saved)."""
        return {k: t for k, t in model.state_dict().items()
                if not (self.config.tie_word_embeddings and k == "lm_head.weight")}


def load_quantized(directory: str | Path, *, dtype: torch.dtype | str | None = None,
                   device: torch.device | str = "cpu"):
    """Load a directory written by `save_quantized` (or `moge quantize`) into a runnable model.

    `dtype` converts the floating-point tensors that are not part of the quantization
    (embeddings, norms, router, lm_head); int8 weights, their scales and biases keep theirs."""
    target = resolve_dtype(dtype)
    ckpt = QuantizedCheckpoint.open(directory)
    cfg = ckpt.config
    model = ckpt.meta_model()
    tensors: dict[str, Tensor] = {}
    for key, value in read_safetensors(ckpt.path, list(ckpt.expected(model))):
        if key in ckpt.quant_keys:
            check_quantized_values(key, value, ckpt.path, signed_scales=ckpt.scheme.signed_scales)
        elif target is not None and value.is_floating_point():
            value = value.to(target)
        tensors[key] = value.to(device)
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rebuild_non_persistent_buffers(model, torch.device(device))
    return model.eval()


def _is_quant_tensor(key: str, t: Tensor, model: nn.Module) -> bool:
    """A tensor owned by a quantized module (int8 weight, fp32 scale or bias): dtype must match exactly."""
    owner = key.rpartition(".")[0]
    module = model.get_submodule(owner) if owner else model
    return isinstance(module, _LINEAR_TYPES + _EXPERT_TYPES)


def check_quantized_values(key: str, value: Tensor, path: Path, *, signed_scales: bool = False) -> None:
    """Refuse int8 values outside -QMAX..QMAX, scales that are not finite and positive (finite and
    nonzero with `signed_scales`: symmetric int4), and NaN/Inf elsewhere (`value` may be any slice
    of the tensor `key`: the sharded loader checks what it reads). Packed int4 bytes are all valid."""
    if value.dtype == torch.int8:
        if value.numel() and int(value.min()) < -QMAX:
            raise CheckpointError(f"{path}: {key} holds the int8 value {int(value.min())}, outside -{QMAX}..{QMAX}: "
                                  f"the file was not written by moge's quantizer or is corrupted")
    elif key.endswith(_SCALE_SUFFIXES):
        ok = torch.isfinite(value) & ((value != 0) if signed_scales else (value > 0))
        if value.numel() and not bool(ok.all()):
            raise CheckpointError(f"{path}: {key} holds the scale {float(value[~ok][0])!r}; scales must be finite "
                                  f"and {'nonzero' if signed_scales else '> 0'} (corrupted file?)")
    elif not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{path}: {key} holds NaN/Inf values (corrupted file?)")
