"""The processes that share a run. In one process every collective the trainer needs is the
identity (`SingleProcess`); under torchrun `moge.train.distributed` supplies the real ones. That
module, and with it `moge.parallel`, is imported only when a run has more than one process or asks
for expert parallelism, so single-process training never loads the parallel layer."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from moge.config import ModelConfig
from moge.errors import ConfigError
from moge.train.checkpointing import (
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    read_optimizer_state,
    write_checkpoint,
)
from moge.train.config import TrainConfig


class Processes(Protocol):
    """What the trainer asks of the processes of a run; every method is collective."""

    rank: int
    world: int

    def shard(self, model: nn.Module) -> nn.Module: ...
    def local_rows(self, batch_BS: torch.Tensor) -> torch.Tensor: ...
    def all_finite(self, loss: torch.Tensor) -> bool: ...
    def finish_gradients(self, model: nn.Module, stats: dict[str, float],
                         max_norm: float) -> tuple[torch.Tensor, dict[str, float]]: ...
    def stop_signal(self, local: int | None) -> int | None: ...
    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, *, tokenizer: str | Path | None, keep: int) -> Path: ...
    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, state: dict) -> None: ...
    def barrier(self) -> None: ...


class SingleProcess:
    """A run in one process: the whole model here, nothing to exchange."""

    rank, world = 0, 1

    def shard(self, model: nn.Module) -> nn.Module:
        return model

    def local_rows(self, batch_BS: torch.Tensor) -> torch.Tensor:
        return batch_BS

    def all_finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss))

    def finish_gradients(self, model: nn.Module, stats: dict[str, float],
                         max_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Clip the global gradient norm; returns it (before clipping) and the stats unchanged."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm), stats

    def stop_signal(self, local: int | None) -> int | None:
        return local

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, *, tokenizer: str | Path | None, keep: int) -> Path:
        """Write and commit checkpoint `step` (`state`: checkpointing.trainer_state) with the
        optimizer state in trainer.pt."""
        state = state | {"optimizer_by_name": optimizer_state_by_name(optimizer, model)}
        return write_checkpoint(root, step, model, model.state_dict(), state, tokenizer=tokenizer, keep=keep)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, state: dict) -> None:
        from moge.checkpoint import load_state_dict_into

        load_state_dict_into(model, path)
        if "optimizer_by_name" in state:
            # saved by expert-parallel ranks: the expert rows come back from their part files
            load_optimizer_state_by_name(optimizer, model, read_optimizer_state(path, state["optimizer_by_name"]))
        else:  # checkpoints written before optimizer state was keyed by name
            optimizer.load_state_dict(state["optimizer"])

    def barrier(self) -> None:
        pass


def join_run(cfg: TrainConfig, model_cfg: ModelConfig) -> Processes:
    """This process's view of the run: alone, or one rank of a torchrun world (groups created here)."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        if cfg.expert_parallel > 1:
            raise ConfigError(f"expert_parallel={cfg.expert_parallel} needs that many processes: launch with "
                              f"torchrun --nproc-per-node {cfg.expert_parallel} -m moge train ...")
        return SingleProcess()
    from moge.train.distributed import DataExpertParallel

    return DataExpertParallel(cfg, model_cfg)
