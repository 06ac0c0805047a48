"""moge: Mixture of Grouped Experts (MoGE) and the Pangu Pro MoE model in PyTorch."""

import importlib
import importlib.util
import sys
import warnings

from moge.config import MoEConfig, ModelConfig, PRESETS, load_model_config

__version__ = "0.1.0"
__all__ = ["MoEConfig", "ModelConfig", "PRESETS", "load_model_config", "__version__"]

# transformers registration (moge.hf). Importing transformers takes seconds, so `import moge` does
# not: the registration runs right after transformers loads its Auto-class modules, or now if it
# already has. The config registers as soon as `AutoConfig` exists; the model only with
# `AutoModelForCausalLM`, since its module is still half-imported when `AutoConfig` first loads.
_REGISTER_AFTER = {
    "transformers.models.auto.configuration_auto": ("moge.hf.config", "register_config"),
    "transformers.models.auto.modeling_auto": ("moge.hf.model", "register_model"),
}


def _register(module_name: str) -> None:
    target, function = _REGISTER_AFTER[module_name]
    try:
        getattr(importlib.import_module(target), function)()
    except Exception as e:  # never break the user's transformers import over our registration
        warnings.warn(f"moge could not register model_type 'PanguProMoE' with transformers ({e!r}); "
                      f"use moge.hf.PanguProMoEForCausalLM directly", stacklevel=2)


class _RegisterOnImport:
    """A meta path finder: lets the normal finders locate the watched modules, then registers once
    they have run (a plain class: importing importlib.abc alone would double `import moge` time)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _REGISTER_AFTER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register(fullname)

        loader.exec_module = exec_then_register
        return spec


def _install_transformers_registration() -> None:
    if importlib.util.find_spec("transformers") is None:
        return
    pending = [name for name in _REGISTER_AFTER if name not in sys.modules]
    for name in _REGISTER_AFTER:
        if name in sys.modules:
            _register(name)
    if pending and not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


_install_transformers_registration()
