"""The model a run trains: the named preset or config.json, fitted to the corpus (vocabulary and
special ids), with an MTP module and aux-loss-free routers when the run asks for them.

The model is built on the meta device and only this process's part of it is ever made: a parallel
plan slices the meta model (shapes only), then every local tensor is initialised to the same part
of what the single-process model gets from the seed (`moge.nn.model.initial_tensor`: one generator
per parameter and per routed expert), bit for bit. An expert-parallel rank makes its own experts and
none of the others'."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor, nn

from moge.checkpoint.build import meta_model, rebuild_non_persistent_buffers
from moge.config import ModelConfig, load_model_config
from moge.errors import ConfigError
from moge.nn.experts import SwiGLUExperts
from moge.nn.model import PanguProMoEForCausalLM, initial_tensor
from moge.nn.moe import MoGEBlock
from moge.nn.routing import Router
from moge.train.config import TrainConfig


def model_config_for(cfg: TrainConfig, vocab_size: int, eos_id: int, pad_id: int) -> ModelConfig:
    """cfg.model with room for the corpus's vocabulary and its EOS / pad ids (EOS doubles as BOS)."""
    model_cfg = load_model_config(cfg.model)
    if model_cfg.vocab_size < vocab_size:
        model_cfg = model_cfg.replace(vocab_size=vocab_size)
    return model_cfg.replace(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=eos_id)


def meta_train_model(model_cfg: ModelConfig, cfg: TrainConfig) -> PanguProMoEForCausalLM:
    """The model the run trains, on the meta device (shapes only): with the MTP module and the
    aux-loss-free routers the run asks for."""
    if cfg.mtp_modules and model_cfg.num_mtp_modules != cfg.mtp_modules:
        model_cfg = model_cfg.replace(num_mtp_modules=cfg.mtp_modules)
    if cfg.mtp_loss_weight > 0 and not model_cfg.num_mtp_modules:
        raise ConfigError(f"mtp_loss_weight={cfg.mtp_loss_weight} needs a model with an MTP module: pass --mtp "
                          f"(mtp_modules=1) or use a model config with num_nextn_predict_layers=1")
    if cfg.aux_scope == "local" and cfg.aux_alpha and model_cfg.is_moe and model_cfg.router != "grouped":
        # the per-group local loss assumes top_k/num_groups experts in every group: MoGE only
        raise ConfigError(f"aux_scope='local' needs router='grouped' (MoGE), not {model_cfg.router!r}: use "
                          f"aux_scope 'micro' or 'global'")
    model = meta_model(model_cfg)
    if cfg.bias_update_rate > 0 and model_cfg.is_moe:
        # aux-loss-free balancing needs routers with the selection-bias buffers
        for block in model.modules():  # the trunk's layers and the MTP module's
            if isinstance(block, MoGEBlock):
                block.router = Router(dataclasses.replace(block.cfg, aux_free_bias=True))  # meta: inherits
    return model


def build_model(model_cfg: ModelConfig, cfg: TrainConfig,
                shard: Callable[[nn.Module], nn.Module] | None = None) -> PanguProMoEForCausalLM:
    """This process's part of the model initialised from cfg.seed, on the CPU. `shard` applies a
    parallel plan to the meta model (moge.parallel.parallelize); without it the whole model is made,
    equal to `PanguProMoEForCausalLM(model_cfg).init_weights(cfg.init_std, cfg.seed)`."""
    model = meta_train_model(model_cfg, cfg)
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    stacked = {f"{m_name}.{p_name}" for m_name, m in model.named_modules() if isinstance(m, SwiGLUExperts)
               for p_name, _ in m.named_parameters(recurse=False)}
    if shard is not None:
        model = shard(model)
    _initialise(model, shapes, stacked, cfg)
    rebuild_non_persistent_buffers(model, "cpu")  # the routers' tables and zero bias, as constructed
    return model


def _initialise(model: nn.Module, shapes: dict, stacked: set[str], cfg: TrainConfig) -> None:
    """Replace every meta parameter by its initial value: the part of the single-process parameter
    that `model.global_slices` (recorded by the plan) says it holds, or the whole of it. Tied
    parameters stay one Parameter."""
    slices = getattr(model, "global_slices", None)
    first_name = {id(p): n for n, p in model.named_parameters()}  # a tied weight's first name, as init_weights
    made: dict[int, nn.Parameter] = {}
    layers = model.config.num_layers
    for m_name, module in model.named_modules():
        for p_name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:
                local = f"{m_name}.{p_name}" if m_name else p_name
                value = _initial_part(slices[local] if slices is not None else None, first_name[id(p)],
                                      shapes, stacked, std=cfg.init_std, num_layers=layers, seed=cfg.seed)
                made[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
            setattr(module, p_name, made[id(p)])


def _initial_part(record, name: str, shapes: dict, stacked: set[str], **init) -> Tensor:
    """The local tensor `record` (a moge.checkpoint.partial.GlobalSlice; None: the whole `name`)
    describes. For stacked experts only the experts the record's pieces cover are generated."""
    if record is None:
        return initial_tensor(name, shapes[name], experts=range(shapes[name][0]) if name in stacked else None,
                              **init)
    key, shape = record.key, shapes[record.key]
    if record.pieces == ((),):  # the whole tensor
        return _initial_part(None, key, shapes, stacked, **init)
    if key not in stacked or not record.pieces:
        return record.take(initial_tensor(key, shape, **init)).clone()
    rows = [piece[0].indices(shape[0])[:2] if piece else (0, shape[0]) for piece in record.pieces]
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    block = initial_tensor(key, shape, experts=range(lo, hi), **init)
    shifted = tuple((slice(start - lo, stop - lo), *piece[1:])
                    for (start, stop), piece in zip(rows, record.pieces, strict=True))
    return dataclasses.replace(record, pieces=shifted).take(block).contiguous()
