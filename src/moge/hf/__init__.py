"""transformers interop: `PanguProMoEConfig` (moge.hf.config) and `PanguProMoEForCausalLM`
(moge.hf.model), registered with the Auto classes when transformers loads (see moge/__init__.py).

Nothing is imported here eagerly: transformers imports moge.hf.config while its own Auto-class
modules are half-loaded, and must not pull in the model module then.
"""

from typing import Any

__all__ = ["PanguProMoEConfig", "PanguProMoEForCausalLM"]


def __getattr__(name: str) -> Any:
    if name == "PanguProMoEConfig":
        from moge.hf.config import PanguProMoEConfig

        return PanguProMoEConfig
    if name == "PanguProMoEForCausalLM":
        from moge.hf.model import PanguProMoEForCausalLM

        return PanguProMoEForCausalLM
    raise AttributeError(f"module 'moge.hf' has no attribute {name!r}")
