"""Hugging Face transformers interop: `AutoConfig`, `AutoModelForCausalLM` and `generate()`.

After `import moge`, transformers' Auto classes know model_type "PanguProMoE" (see `register`;
moge/__init__.py arranges for it to run when transformers loads its Auto classes), so a
released-layout checkpoint directory loads with `AutoModelForCausalLM.from_pretrained(dir)`.

Our modules do the computing: `PanguProMoEForCausalLM` here is a thin `PreTrainedModel` +
`GenerationMixin` shell around `moge.nn.model.PanguProMoEForCausalLM`. It registers that model's
`model` and `lm_head` as its own children, so parameter names are ours (stacked experts), and it
loads and saves through moge.checkpoint, which maps them to the release's per-expert files.
`generate()` caches keys/values in transformers' own cache object through `_CacheView`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from moge import checkpoint
from moge.errors import ConfigError, MissingFileError
from moge.hf.config import PanguProMoEConfig, register_config
from moge.nn.model import PanguProMoEForCausalLM as MoGECausalLM
from moge.nn.model import sdpa

__all__ = ["PanguProMoEConfig", "PanguProMoEForCausalLM", "register", "register_model"]

# from_pretrained options that only concern downloading from the Hub or transformers' own loader:
# a local checkpoint directory makes them moot, so they are accepted and ignored.
_LOADER_OPTIONS_IGNORED = frozenset({
    "cache_dir", "force_download", "proxies", "revision", "token", "local_files_only", "subfolder",
    "trust_remote_code", "code_revision", "use_safetensors", "low_cpu_mem_usage", "_from_auto",
    "_commit_hash", "adapter_kwargs", "attn_implementation", "output_loading_info", "weights_only",
})


class _CacheView:
    """Our model's cache protocol (`length`, `update`, `attend`) over a transformers `Cache`.

    Built once per forward call: `length` must stay the cached length from before this call while
    the layers append to the transformers cache one by one. Transformers passes the attention mask
    of the whole sequence, so no padding history is kept here (`valid_BT` None = all cached slots
    are real unless the mask says otherwise)."""

    valid_BT = None

    def __init__(self, cache: Cache, max_len: int):
        self.cache = cache
        self.length = cache.get_seq_length()
        self.max_len = max_len

    def update(self, layer: int, k_BHSd: Tensor, v_BHSd: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k_BHSd, v_BHSd, layer)

    def attend(self, layer: int, q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask: Tensor | None) -> Tensor:
        k, v = self.update(layer, k_BHSd, v_BHSd)
        return sdpa(q_BHSd, k, v, mask)


class PanguProMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers face of `moge.nn.model.PanguProMoEForCausalLM` (same weights, same numbers).

    `forward` returns `CausalLMOutputWithPast` with fp32 logits; `from_pretrained` /
    `save_pretrained` read and write the released checkpoint layout via moge.checkpoint."""

    config_class = PanguProMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: PanguProMoEConfig, core: MoGECausalLM | None = None):
        super().__init__(config)
        moge_cfg = config.moge_config()
        if core is None:
            core = MoGECausalLM(moge_cfg)
        elif core.config != moge_cfg:
            raise ConfigError(f"the model's config {core.config} does not match the given PanguProMoEConfig "
                             f"({moge_cfg})")
        # Kept outside the module tree (no "core." prefix on every parameter name): its children
        # are registered below, so .to(), state_dict() and parameters() all see the same tensors.
        object.__setattr__(self, "core", core)
        self.model = core.model
        self.lm_head = core.lm_head
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Our modules initialise themselves when built (and loading overwrites them anyway)."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, past_key_values: Cache | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """transformers calling convention. `attention_mask` is [batch, past + new] (1 = token,
        0 = padding) or [batch, new]; `cache` (alias `past_key_values`) a transformers Cache, created
        here when `use_cache` and none is given; `logits_to_keep` > 0 keeps the last positions only."""
        if inputs_embeds is not None:
            raise ConfigError("inputs_embeds is not supported: pass input_ids (the model embeds them itself)")
        if input_ids is None:
            raise ConfigError("input_ids is required")
        if cache is None:
            cache = past_key_values
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ConfigError(f"attention_mask must be 2-D [batch, seq] (1 = token, 0 = padding), got shape "
                             f"{tuple(attention_mask.shape)}")
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        view = _CacheView(cache, self.core.config.max_position_embeddings) if cache is not None else None

        keep = logits_to_keep
        logits_slice = slice(-keep, None) if isinstance(keep, int) and keep > 0 else None
        out = self.core(input_ids, positions=position_ids, cache=view, attention_mask=attention_mask,
                        logits_slice=logits_slice)
        logits = out.logits
        if isinstance(keep, Tensor):
            if keep.dim() != 1:
                raise ConfigError(f"logits_to_keep must be an int or a 1-D tensor of positions, got shape "
                                 f"{tuple(keep.shape)}")
            logits = logits[:, keep.to(logits.device)]

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ConfigError("labels need the logits of every position: call with logits_to_keep=0")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # ---- loading and saving in the released layout ----------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: PanguProMoEConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, **kwargs: Any) -> "PanguProMoEForCausalLM":
        """Load a local checkpoint directory with moge.checkpoint. `dtype` (alias `torch_dtype`):
        a torch dtype, its name, or "auto"/None to keep the files' dtype; `device_map`: one device."""
        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args!r}: options go by keyword")
        unknown = sorted(k for k in kwargs if k not in _LOADER_OPTIONS_IGNORED)
        if unknown:
            raise TypeError(f"from_pretrained got unsupported options {unknown}; supported: config, dtype "
                            f"(torch_dtype), device_map (one device), and the Hub options, which a local "
                            f"directory ignores")
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            raise MissingFileError(f"{str(directory)!r} is not a local checkpoint directory (config.json + "
                                    f"safetensors in the released layout); download it first")
        if dtype is None:
            dtype = torch_dtype
        if dtype == "auto":
            dtype = None
        device = _single_device(device_map)
        core = checkpoint.load_pretrained(directory, dtype=dtype, device=device)
        if config is None:
            config = PanguProMoEConfig.from_pretrained(directory)
        model = cls(config, core=core)
        model.config.dtype = next(core.parameters()).dtype
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_bytes: int | None = None,
                        dtype: torch.dtype | str | None = None, **kwargs: Any) -> None:
        """Write the released layout (config.json, safetensors shards, index) with moge.checkpoint,
        plus generation_config.json. transformers' own saving options are not supported."""
        if kwargs:
            raise TypeError(f"save_pretrained got unsupported options {sorted(kwargs)}; supported: "
                            f"max_shard_bytes, dtype")
        options: dict[str, Any] = {"dtype": dtype}
        if max_shard_bytes is not None:
            options["max_shard_bytes"] = max_shard_bytes
        checkpoint.save_pretrained(self.core, save_directory, **options)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)


def _single_device(device_map: Any) -> torch.device:
    """`device_map` as one device: None/"cpu"/"cuda:0"/a torch.device, or {"": device}."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return torch.device(device_map)
    raise ConfigError(f"device_map={device_map!r} is not supported: the model loads onto one device; pass it "
                     f"as a string, torch.device, index or {{'': device}}")


def register_model() -> None:
    """Make `AutoModelForCausalLM` build `PanguProMoEForCausalLM` for `PanguProMoEConfig`."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.register(PanguProMoEConfig, PanguProMoEForCausalLM, exist_ok=True)


def register() -> None:
    """Register model_type "PanguProMoE" with `AutoConfig` and `AutoModelForCausalLM` (idempotent)."""
    register_config()
    register_model()

