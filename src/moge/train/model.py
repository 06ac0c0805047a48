"""The model a run trains: the named preset or config.json, fitted to the corpus (vocabulary and
special ids), with an MTP module and aux-loss-free routers when the run asks for them."""

from __future__ import annotations

import dataclasses

from moge.config import ModelConfig, load_model_config
from moge.errors import ConfigError
from moge.nn.model import PanguProMoEForCausalLM
from moge.nn.moe import MoGEBlock
from moge.nn.routing import Router
from moge.train.config import TrainConfig


def model_config_for(cfg: TrainConfig, vocab_size: int, eos_id: int, pad_id: int) -> ModelConfig:
    """cfg.model with room for the corpus's vocabulary and its EOS / pad ids (EOS doubles as BOS)."""
    model_cfg = load_model_config(cfg.model)
    if model_cfg.vocab_size < vocab_size:
        model_cfg = model_cfg.replace(vocab_size=vocab_size)
    return model_cfg.replace(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=eos_id)


def build_model(model_cfg: ModelConfig, cfg: TrainConfig) -> PanguProMoEForCausalLM:
    """The whole model, initialised from cfg.seed (every rank of a parallel run builds the same one)."""
    if cfg.mtp_modules and model_cfg.num_mtp_modules != cfg.mtp_modules:
        model_cfg = model_cfg.replace(num_mtp_modules=cfg.mtp_modules)
    if cfg.mtp_loss_weight > 0 and not model_cfg.num_mtp_modules:
        raise ConfigError(f"mtp_loss_weight={cfg.mtp_loss_weight} needs a model with an MTP module: pass --mtp "
                          f"(mtp_modules=1) or use a model config with num_nextn_predict_layers=1")
    model = PanguProMoEForCausalLM(model_cfg)
    if cfg.bias_update_rate > 0 and model_cfg.is_moe:
        # aux-loss-free balancing needs routers with the selection-bias buffers
        for block in model.modules():  # the trunk's layers and the MTP module's
            if isinstance(block, MoGEBlock):
                block.router = Router(dataclasses.replace(block.cfg, aux_free_bias=True))
    return model.init_weights(cfg.init_std, seed=cfg.seed)
