"""moge: Mixture of Grouped Experts (MoGE) and the Pangu Pro MoE model in PyTorch."""

from moge.config import MoEConfig, ModelConfig, PRESETS, load_model_config

__version__ = "0.1.0"
__all__ = ["MoEConfig", "ModelConfig", "PRESETS", "load_model_config", "__version__"]
