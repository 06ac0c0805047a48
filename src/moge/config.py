"""Configuration dataclasses: one validated source of truth for every shape and routing choice.

`MoEConfig` describes one MoE / MoGE layer; `ModelConfig` a whole decoder (dense, top-K MoE or
MoGE) and reads/writes the Hugging Face style `config.json` of the Pangu Pro MoE release.
Every check raises `ConfigError` (a `ValueError`) naming the field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moge.errors import ConfigError, MissingFileError, bad_value

ROUTERS = ("grouped", "topk", "softmax_topk", "group_limited")
BACKENDS = ("auto", "grouped_mm", "loop", "reference")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise bad_value(name, value, "must be a positive integer")


@dataclass(frozen=True)
class MoEConfig:
    """One mixture-of-experts layer.

    router:
      grouped        MoGE: global softmax, top-(top_k/num_groups) inside each of num_groups groups
      topk           conventional MoE (paper Eq. 2): softmax over the top_k kept logits
      softmax_topk   softmax over all experts, keep the top_k (optionally renormalised)
      group_limited  DeepSeek-V3: sigmoid affinities (+ the selection bias), keep topk_groups groups by
                     their top-2 biased score sum, then top_k; weights are the unbiased affinities
                     normalised over the top_k (always: renormalize does not apply)
    """

    hidden_size: int
    num_experts: int = 64
    top_k: int = 8
    expert_intermediate_size: int = 1344
    num_groups: int = 8
    router: str = "grouped"
    renormalize: bool = False
    topk_groups: int = 4
    expert_to_group: tuple[int, ...] | None = None
    shared_expert_sizes: tuple[int, ...] = ()
    shared_expert_gate: bool = False
    aux_free_bias: bool = False
    backend: str = "auto"
    check_finite: bool = False
    # Voted experts (the release's Ascend 300I Duo inference code): per batch, each group keeps its
    # num_voted_experts most-selected experts and re-routes every token among them. None = off.
    num_voted_experts: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_experts", "top_k", "expert_intermediate_size", "num_groups"):
            _positive(name, getattr(self, name))
        if self.router not in ROUTERS:
            raise bad_value("router", self.router, f"choose one of {ROUTERS}")
        if self.backend not in BACKENDS:
            raise bad_value("backend", self.backend, f"choose one of {BACKENDS}")
        n, m, k = self.num_experts, self.num_groups, self.top_k
        if k > n:
            raise bad_value("top_k", k, f"must be <= num_experts={n}")
        if self.router in ("grouped", "group_limited") or self.expert_to_group is not None:
            if n % m:
                raise bad_value("num_groups", m, f"must divide num_experts={n} (valid: {divisors(n)})")
        if self.router == "grouped":
            if k % m:
                raise bad_value("top_k", k, f"must be a multiple of num_groups={m} so every group keeps "
                           f"top_k/num_groups experts (valid: {[m * i for i in range(1, n // m + 1)]})")
            if k // m > n // m:
                raise bad_value("top_k", k, f"top_k/num_groups={k // m} exceeds the {n // m} experts per group")
        if self.num_voted_experts is not None:
            self._check_voted()
        if self.router == "group_limited":
            _positive("topk_groups", self.topk_groups)
            if self.topk_groups > m:
                raise bad_value("topk_groups", self.topk_groups, f"must be <= num_groups={m}")
            if k > self.topk_groups * (n // m):
                raise bad_value("top_k", k, f"must be <= topk_groups*experts_per_group="
                           f"{self.topk_groups * (n // m)}")
        if self.expert_to_group is not None:
            groups = tuple(int(g) for g in self.expert_to_group)
            object.__setattr__(self, "expert_to_group", groups)
            if len(groups) != n:
                raise bad_value("expert_to_group", f"<{len(groups)} entries>", f"needs one group id per expert ({n})")
            sizes = [groups.count(g) for g in range(m)]
            if any(g < 0 or g >= m for g in groups) or any(s != n // m for s in sizes):
                raise bad_value("expert_to_group", groups, f"must put exactly {n // m} experts in each of the "
                           f"{m} groups 0..{m - 1}")
        sizes = tuple(self.shared_expert_sizes)
        object.__setattr__(self, "shared_expert_sizes", sizes)
        for i, s in enumerate(sizes):
            _positive(f"shared_expert_sizes[{i}]", s)

    def _check_voted(self) -> None:
        v, per, kp = self.num_voted_experts, self.num_experts // self.num_groups, self.top_k // self.num_groups
        if self.router != "grouped":
            raise bad_value("num_voted_experts", v, f"voted experts need router='grouped', not {self.router!r} "
                       f"(None turns voting off)")
        if not isinstance(v, int) or isinstance(v, bool) or not kp <= v <= per:
            raise bad_value("num_voted_experts", v, f"must be an integer in {kp}..{per} (top_k/num_groups.."
                       f"experts_per_group), or None for no voting")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def top_k_per_group(self) -> int:
        """K' of the paper (only meaningful for the grouped router)."""
        return self.top_k // self.num_groups

    def group_of_expert(self) -> list[int]:
        """Group id of each expert: contiguous blocks unless an explicit assignment is given."""
        if self.expert_to_group is not None:
            return list(self.expert_to_group)
        return [e // self.experts_per_group for e in range(self.num_experts)]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# Hugging Face config.json keys of the release and their ModelConfig fields.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "num_experts": "num_experts",
    "num_experts_per_tok": "top_k",
    "moe_intermediate_size": "expert_intermediate_size",
    "shared_expert_intermediate_size": "shared_expert_intermediate_size",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "head_dim": "head_dim",
    "attention_bias": "attention_bias",
    # our own fields (absent in the release; defaults reproduce it)
    "num_expert_groups": "num_groups",
    "moe_router": "router",
    "moe_renormalize": "renormalize",
    "moe_topk_groups": "topk_groups",
    "num_voted_experts": "num_voted_experts",  # written only when set (0 or null = off)
    # multi-token prediction modules (DeepSeek-V3's key name; written only when > 0)
    "num_nextn_predict_layers": "num_mtp_modules",
}
# The floating dtypes config.json's torch_dtype may name (what the saved weights are).
TORCH_DTYPES = ("float32", "bfloat16", "float16")
_HF_IGNORED = {"model_type", "architectures", "hidden_act", "torch_dtype", "dtype", "transformers_version",
               "auto_map", "use_cache", "initializer_range", "attention_dropout", "sliding_window",
               "use_sliding_window", "max_window_layers", "rope_scaling", "output_router_logits",
               "router_aux_loss_coef", "norm_topk_prob", "decoder_sparse_step",
               "mlp_only_layers", "qkv_bias", "router_enable_expert_bias"}
# A config.json without a group field is read as the release (8 groups). That is only right for the
# release's own model_type (or none, as older files of ours); another family must state its routing
# with our fields, or it is refused instead of silently becoming MoGE.
_OWN_MODEL_TYPES = (None, "PanguProMoE")
_ROUTING_KEYS = ("num_expert_groups", "moe_router")
# Families whose layers differ from ours in ways no field here can express.
_UNRUNNABLE_FAMILIES = {
    "qwen2_moe": "Qwen2-MoE scales its shared expert by a learned sigmoid gate (shared_expert_gate) and its "
                 "attention output projection has no bias; this model has neither, so it cannot run that "
                 "checkpoint faithfully (valid: a 'PanguProMoE' config)",
}


@dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder: dense (num_experts == 0), top-K MoE or MoGE. Defaults = Pangu Pro MoE."""

    vocab_size: int = 153376
    hidden_size: int = 5120
    num_layers: int = 48
    num_heads: int = 40
    num_kv_heads: int = 8
    head_dim: int | None = None  # None: hidden_size / num_heads (see head_size)
    num_experts: int = 64
    top_k: int = 8
    num_groups: int = 8
    expert_intermediate_size: int = 1344
    shared_expert_intermediate_size: int = 5376
    intermediate_size: int = 0  # dense MLP width, used when num_experts == 0
    router: str = "grouped"
    renormalize: bool = False
    topk_groups: int = 4
    num_voted_experts: int | None = None  # voted experts per group (MoEConfig); None = off
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 16_000_000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 45892
    pad_token_id: int = 0
    # Multi-token prediction (DeepSeek-V3, arXiv 2412.19437): extra blocks predicting token t+2
    # from the trunk's hidden state at t and the embedding of token t+1 (moge.nn.model.MTPModule).
    num_mtp_modules: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            _positive(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise bad_value("num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size} "
                           f"(valid: {divisors(self.hidden_size)}) unless head_dim is given")
        else:
            _positive("head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise bad_value("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads} "
                       f"(valid: {divisors(self.num_heads)})")
        if self.num_experts < 0:
            raise bad_value("num_experts", self.num_experts, "must be >= 0 (0 = dense MLP)")
        if self.num_experts == 0:
            _positive("intermediate_size", self.intermediate_size)
        else:
            self.moe()  # validates the expert fields
        if (not isinstance(self.num_mtp_modules, int) or isinstance(self.num_mtp_modules, bool)
                or self.num_mtp_modules not in (0, 1)):
            raise bad_value("num_mtp_modules", self.num_mtp_modules,
                       "must be 0 (no multi-token prediction) or 1 (one MTP module); more are not supported")
        if self.shared_expert_intermediate_size < 0:
            raise bad_value("shared_expert_intermediate_size", self.shared_expert_intermediate_size, "must be >= 0")
        if not self.rms_norm_eps > 0:
            raise bad_value("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if not self.rope_theta > 0:
            raise bad_value("rope_theta", self.rope_theta, "must be > 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise bad_value(name, v, f"must be a token id in [0, vocab_size={self.vocab_size})")

    @property
    def head_size(self) -> int:
        """Per-head width: `head_dim` when given, else hidden_size / num_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def moe(self, **overrides: Any) -> MoEConfig:
        """The per-layer MoE config this model uses."""
        shared = (self.shared_expert_intermediate_size,) if self.shared_expert_intermediate_size else ()
        kw = dict(hidden_size=self.hidden_size, num_experts=self.num_experts, top_k=self.top_k,
                  expert_intermediate_size=self.expert_intermediate_size, num_groups=self.num_groups,
                  router=self.router, renormalize=self.renormalize, topk_groups=self.topk_groups,
                  shared_expert_sizes=shared, num_voted_experts=self.num_voted_experts)
        kw.update(overrides)
        return MoEConfig(**kw)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- parameter arithmetic (reproduces the paper's 71.99B / 16.50B) ---------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Total and activated parameters, counted as the paper does (both embedding matrices)."""
        d, hd = self.hidden_size, self.head_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d
        if self.attention_bias:
            attn += q + 2 * kv + d
        norms = 2 * d
        swiglu = lambda width: 3 * d * width  # noqa: E731
        shared = swiglu(self.shared_expert_intermediate_size)
        if self.is_moe:
            expert = swiglu(self.expert_intermediate_size)
            router = d * self.num_experts + self.num_experts  # gate weight + router_scale
            layer_total = attn + norms + shared + router + self.num_experts * expert
            layer_active = attn + norms + shared + router + self.top_k * expert
        else:
            layer_total = layer_active = attn + norms + shared + swiglu(self.intermediate_size)
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        rest = embed + head + d
        # an MTP module: one more decoder layer, its three norms and the 2D -> D projection (it
        # shares the embedding and lm_head)
        mtp_extra = 3 * d + 2 * d * d
        mtp_total = self.num_mtp_modules * (layer_total + mtp_extra)
        mtp_active = self.num_mtp_modules * (layer_active + mtp_extra)
        return {"total": self.num_layers * layer_total + rest + mtp_total,
                "activated": self.num_layers * layer_active + rest + mtp_active,
                "per_layer_total": layer_total, "per_layer_activated": layer_active,
                "attention_per_layer": attn, "embedding": embed, "lm_head": head, "mtp": mtp_total}

    # ---- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a config.json dict; refuse (ConfigError naming the field) what this model cannot run."""
        _check_foreign_fields(d)
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key in _HF_KEYS:
                kw[_HF_KEYS[key]] = value
            elif key not in _HF_IGNORED:
                extra[key] = value
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise bad_value("hidden_act", act, "only 'silu' (SwiGLU) is supported")
        if isinstance(kw.get("eos_token_id"), list):
            eos = kw["eos_token_id"]
            if len(eos) != 1:
                raise bad_value("eos_token_id", eos, "give one id: generation here stops on a single EOS id")
            kw["eos_token_id"] = eos[0]
        if d.get("norm_topk_prob") is not None:
            norm = bool(d["norm_topk_prob"])
            if "renormalize" in kw and bool(kw["renormalize"]) != norm:
                raise bad_value("norm_topk_prob", d["norm_topk_prob"], f"contradicts moe_renormalize="
                                f"{kw['renormalize']!r}: give one of them, or the same value")
            kw["renormalize"] = norm
        if "num_experts" in kw and kw["num_experts"] in (None, 0):
            kw["num_experts"] = 0
        if "qkv_bias" in d and "attention_bias" not in d:
            kw["attention_bias"] = bool(d["qkv_bias"])
        if kw.get("num_experts", 1) and "num_groups" not in kw:
            # The release has no group field: Pangu Pro MoE is 64 experts in 8 groups.
            kw["num_groups"] = 8 if kw.get("num_experts", 64) % 8 == 0 else 1
        if kw.get("num_experts", 1) and "shared_expert_intermediate_size" not in kw:
            kw["shared_expert_intermediate_size"] = 0
        if kw.get("num_voted_experts") == 0 or kw.get("num_experts") == 0:  # 0 / null: no voting
            kw["num_voted_experts"] = None
        if kw.get("num_experts") == 0:
            kw.setdefault("top_k", 1)
            kw["num_groups"] = 1
            kw["router"] = "topk"
            kw.setdefault("shared_expert_intermediate_size", 0)
        return cls(**kw, extra=extra)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
        """The release's config.json fields. `torch_dtype` ("float32", "bfloat16", ...) is the dtype
        the weights beside it are saved in: a checkpoint writer knows it, the config alone does not
        (written only when given; loaders default to it)."""
        inv = {v: k for k, v in _HF_KEYS.items()}
        out: dict[str, Any] = {"architectures": ["PanguProMoEForCausalLM"], "model_type": "PanguProMoE",
                               "hidden_act": "silu"}
        if torch_dtype is not None:
            if torch_dtype not in TORCH_DTYPES:
                raise bad_value("torch_dtype", torch_dtype, f"choose one of {TORCH_DTYPES}")
            out["torch_dtype"] = torch_dtype
        for f in dataclasses.fields(self):
            if f.name == "extra" or (f.name == "head_dim" and self.head_dim is None) or \
                    (f.name == "num_mtp_modules" and not self.num_mtp_modules) or \
                    (f.name == "num_voted_experts" and self.num_voted_experts is None):
                continue
            out[inv[f.name]] = getattr(self, f.name)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingFileError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_hf_dict(data)

    def to_json(self, path: str | Path, torch_dtype: str | None = None) -> None:
        from moge.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(torch_dtype), indent=2, sort_keys=True) + "\n")


def _check_foreign_fields(d: dict) -> None:
    """Refuse config.json fields of other MoE families that this model cannot honour."""
    model_type = d.get("model_type")
    if model_type in _UNRUNNABLE_FAMILIES:
        raise bad_value("model_type", model_type, _UNRUNNABLE_FAMILIES[model_type])
    if model_type not in _OWN_MODEL_TYPES and not any(k in d for k in _ROUTING_KEYS):
        raise bad_value("model_type", model_type, f"this reader knows 'PanguProMoE'; a config of another "
                        f"family must state its routing with {' or '.join(_ROUTING_KEYS)} (otherwise it "
                        "would be read as 8-group MoGE)")
    layers = d.get("mlp_only_layers")
    if layers:
        raise bad_value("mlp_only_layers", layers, "must be empty: every layer of this model has the same MoE MLP")
    step = d.get("decoder_sparse_step")
    if step is not None and step != 1:
        raise bad_value("decoder_sparse_step", step, "must be 1: every layer of this model is an MoE layer")


# Presets: the released shape, small same-structure CPU models, and published dense shapes
# (Qwen2.5 configs as published with the models) for the simulator.
PRESETS: dict[str, ModelConfig] = {
    "pangu-pro-moe": ModelConfig(),
    "moge-tiny": ModelConfig(vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             num_experts=16, top_k=4, num_groups=4, expert_intermediate_size=128,
                             shared_expert_intermediate_size=256, max_position_embeddings=1024,
                             rope_theta=10000.0, eos_token_id=2, pad_token_id=0),
    # The fair comparison (equal activated parameters, equal tokens): moge-tiny above, the same
    # experts with conventional top-K routing, and a dense model with the same activated MLP width
    # (K * expert width + shared = 4 * 128 + 256).
    "topk-tiny": ModelConfig(vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             num_experts=16, top_k=4, num_groups=4, router="topk", expert_intermediate_size=128,
                             shared_expert_intermediate_size=256, max_position_embeddings=1024,
                             rope_theta=10000.0, eos_token_id=2, pad_token_id=0),
    # DeepSeek-V3's routing (router="group_limited") on the same experts: every shape as above, so
    # it has exactly moge-tiny's activated parameters (routing adds no parameter; the selection
    # bias is a buffer).
    "deepseek-tiny": ModelConfig(vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                 num_experts=16, top_k=4, num_groups=4, router="group_limited", topk_groups=2,
                                 expert_intermediate_size=128, shared_expert_intermediate_size=256,
                                 max_position_embeddings=1024, rope_theta=10000.0, eos_token_id=2, pad_token_id=0),
    "dense-tiny": ModelConfig(vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                              num_experts=0, top_k=1, num_groups=1, router="topk", intermediate_size=768,
                              shared_expert_intermediate_size=0, max_position_embeddings=1024,
                              rope_theta=10000.0, eos_token_id=2, pad_token_id=0),
    "moge-small": ModelConfig(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                              num_experts=64, top_k=8, num_groups=8, expert_intermediate_size=256,
                              shared_expert_intermediate_size=1024, max_position_embeddings=2048,
                              rope_theta=10000.0, eos_token_id=2, pad_token_id=0),
    "qwen2.5-32b": ModelConfig(vocab_size=152064, hidden_size=5120, num_layers=64, num_heads=40, num_kv_heads=8,
                               num_experts=0, top_k=1, num_groups=1, router="topk", intermediate_size=27648,
                               shared_expert_intermediate_size=0, rms_norm_eps=1e-6, rope_theta=1e6,
                               max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645,
                               pad_token_id=151643),
    "qwen2.5-72b": ModelConfig(vocab_size=152064, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                               num_experts=0, top_k=1, num_groups=1, router="topk", intermediate_size=29568,
                               shared_expert_intermediate_size=0, rms_norm_eps=1e-6, rope_theta=1e6,
                               max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645,
                               pad_token_id=151643),
}


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name, a config.json path, or a checkpoint directory holding config.json."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if path.exists():
        return ModelConfig.from_json(path)
    raise ConfigError(f"model={key!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                     f"config.json or checkpoint directory")
