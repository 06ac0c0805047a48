"""`PanguProMoEConfig`: the release's config.json as a transformers config (`model_type` "PanguProMoE").

It lives apart from moge.hf.model because transformers loads its config registry while its own modelling
module is still half-imported; registering the config must therefore import nothing heavier than
`transformers.configuration_utils`. `moge.config.ModelConfig` stays the one source of truth: the
defaults here are its `to_hf_dict()`, and `moge_config()` converts back with `from_hf_dict`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from transformers.configuration_utils import PretrainedConfig

from moge.config import ModelConfig

MODEL_TYPE = "PanguProMoE"

# Keys the file header names, not model fields: they never reach ModelConfig.
_FILE_KEYS = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


@cache
def _release_defaults() -> dict[str, Any]:
    """Every model key of the release's config.json, with the released model's values."""
    return {k: v for k, v in ModelConfig().to_hf_dict().items() if k not in _FILE_KEYS}


@cache
def _transformers_keys() -> frozenset[str]:
    """Keys every transformers config carries (return_dict, id2label, ...): not model fields."""
    return frozenset(PretrainedConfig().to_dict()) | {"use_cache", "_name_or_path"}


class PanguProMoEConfig(PretrainedConfig):
    """Hugging Face view of a `ModelConfig`. Keys missing from the file take the released model's
    values (as `ModelConfig` does); an invalid combination fails here, with ModelConfig's message."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __post_init__(self, **kwargs: Any) -> None:
        for key, value in _release_defaults().items():
            kwargs.setdefault(key, value)
        super().__post_init__(**kwargs)
        self.moge_config()

    @property
    def layer_types(self) -> list[str]:
        """Every layer is full attention: transformers' caches read this to size themselves, and
        without it they would honour a stray `sliding_window` key that this model ignores."""
        return ["full_attention"] * self.num_hidden_layers

    def moge_config(self) -> ModelConfig:
        """Our validated config, built from this one's keys (transformers' own keys left out)."""
        own = _transformers_keys()
        return ModelConfig.from_hf_dict({k: v for k, v in self.to_dict().items() if k not in own})


def register_config() -> None:
    """Make `AutoConfig` map model_type "PanguProMoE" to `PanguProMoEConfig`."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, PanguProMoEConfig, exist_ok=True)
