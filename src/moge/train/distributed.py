"""Data x expert parallel training under torchrun: every rank is a data-parallel rank with
batch_size / world rows of each micro-batch, and the routed experts are split over
`expert_parallel` ranks. Every rank builds the same whole model (same seed) and keeps its expert
shard; checkpoints hold the whole model, so they load at any expert-parallel size.

The only module of moge.train that touches torch.distributed collectives or moge.parallel.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moge.config import ModelConfig
from moge.degrees import check_divides_world, check_expert_parallel
from moge.errors import ConfigError
from moge.parallel.expert import full_state_dict, gather_expert_tensor, is_expert_param, shard_model, shard_state_dict
from moge.parallel.launch import comm_device
from moge.parallel.mesh import ExpertParallelMesh
from moge.parallel.training import clip_grad_norm, reduce_gradients
from moge.train.checkpointing import load_optimizer_state_by_name, optimizer_state_by_name
from moge.train.config import TrainConfig, TrainingError


class DataExpertParallel:
    """This rank of a data x expert parallel run (the `Processes` of moge.train.processes)."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size={cfg.batch_size} is invalid: must be divisible by the {self.world} "
                              f"data-parallel ranks")
        check_divides_world("expert_parallel", cfg.expert_parallel, self.world)
        if model_cfg.is_moe:
            check_expert_parallel(model_cfg, cfg.expert_parallel)
        elif cfg.expert_parallel > 1:
            raise ConfigError(f"expert_parallel={cfg.expert_parallel} is invalid: {cfg.model} is dense (no experts "
                              f"to split); use 1")
        self.rows = cfg.batch_size // self.world
        self.mesh = ExpertParallelMesh.build(cfg.expert_parallel)
        self.device = comm_device()  # where control tensors live for the default group's backend

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.mesh, same_tokens_per_rank=True)  # every micro-batch has one shape

    def local_rows(self, batch_BS: torch.Tensor) -> torch.Tensor:
        return batch_BS[self.rank * self.rows:(self.rank + 1) * self.rows]

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank agrees, so they all stop together instead of leaving the others waiting."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        dist.all_reduce(bad)
        return not bool(bad)

    def finish_gradients(self, model: nn.Module, stats: dict[str, float],
                         max_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Average gradients and logged stats over the ranks, then clip by the whole model's norm."""
        reduce_gradients(model, self.mesh)
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        mean = {k: float(v) / self.world for k, v in zip(keys, values, strict=True)}
        return clip_grad_norm(model.named_parameters(), max_norm, self.mesh), mean

    def stop_signal(self, local: int | None) -> int | None:
        """A signal on any rank stops every rank after the same step."""
        flag = torch.tensor([float(local or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def state_to_save(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The whole model's weights and optimizer state on every rank (expert shards gathered)."""
        return full_state_dict(model, self.mesh), optimizer_state_by_name(optimizer, model, self._whole)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, state: dict) -> None:
        """Read the whole checkpoint, keep this rank's expert shard."""
        from moge.checkpoint import load_pretrained

        if "optimizer_by_name" not in state:
            raise TrainingError(f"{path}/trainer.pt predates expert-parallel checkpoints; resume it with a "
                                f"single process first")
        whole = load_pretrained(path).state_dict()
        model.load_state_dict(shard_state_dict(whole, self.mesh))
        del whole
        load_optimizer_state_by_name(optimizer, model, state["optimizer_by_name"], self._local)

    def _whole(self, name: str, value: Tensor, param: nn.Parameter) -> Tensor:
        """An expert parameter's optimizer state gathered over the EP group (collective)."""
        if is_expert_param(name) and value.shape == param.shape:
            return gather_expert_tensor(value, self.mesh)
        return value

    def _local(self, name: str, value: Tensor, param: nn.Parameter) -> Tensor:
        """This rank's experts of a whole model's expert state (saved at any EP size)."""
        if is_expert_param(name) and value.shape[0] != param.shape[0] and \
                value.shape[0] == param.shape[0] * self.mesh.ep:
            experts = self.mesh.expert_range(value.shape[0])
            return value[experts.start:experts.stop]
        return value

    def barrier(self) -> None:
        dist.barrier()
