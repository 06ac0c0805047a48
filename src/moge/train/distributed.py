"""Data x expert parallel training under torchrun: every rank is a data-parallel rank with
batch_size / world rows of each micro-batch, and the routed experts are split over
`expert_parallel` ranks. Every rank builds the model on the meta device, shards it there and makes
only its own part, equal bit for bit to that part of the single-process initialisation
(moge.train.model). A checkpoint is written by the ranks together, with nothing gathered: each EP rank of the
first replica writes the safetensors shards of its experts and its part of the optimizer state into
one staging directory, rank 0 also the rest, and rank 0 commits only once every rank has succeeded.
The result is an ordinary released-layout checkpoint that loads at any expert-parallel size.

The only module of moge.train that touches torch.distributed collectives or moge.parallel (besides
moge.train.dryrun, which sizes ranks with no process group).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moge.config import ModelConfig
from moge.degrees import check_divides_world, check_expert_parallel
from moge.errors import ConfigError
from moge.parallel.expert import is_expert_param, shard_model
from moge.parallel.launch import comm_device
from moge.parallel.mesh import ExpertParallelMesh
from moge.parallel.training import clip_grad_norm, reduce_gradients
from moge.train import checkpointing
from moge.train.checkpointing import load_optimizer_state_by_name, optimizer_state_by_name, read_optimizer_state
from moge.train.config import TrainConfig, TrainingError


def check_layout(cfg: TrainConfig, model_cfg: ModelConfig, world: int) -> None:
    """The run's batch and expert-parallel size fit `world` data-parallel ranks and the model."""
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is invalid: must be divisible by the {world} "
                          f"data-parallel ranks")
    check_divides_world("expert_parallel", cfg.expert_parallel, world)
    if model_cfg.is_moe:
        check_expert_parallel(model_cfg, cfg.expert_parallel)
    elif cfg.expert_parallel > 1:
        raise ConfigError(f"expert_parallel={cfg.expert_parallel} is invalid: {cfg.model} is dense (no experts "
                          f"to split); use 1")


class DataExpertParallel:
    """This rank of a data x expert parallel run (the `Processes` of moge.train.processes)."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_layout(cfg, model_cfg, self.world)
        self.rows = cfg.batch_size // self.world
        self.mesh = ExpertParallelMesh.build(cfg.expert_parallel)
        self.device = comm_device()  # where control tensors live for the default group's backend

    def shard(self, model: nn.Module) -> nn.Module:
        """This rank's part of `model` (a meta-device model: shapes only, see moge.train.model)."""
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

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, *, tokenizer: str | Path | None, keep: int) -> Path:
        """Write checkpoint `step` from the ranks of the first replica (see the module docstring)
        and commit it once all have finished. A failure on any rank raises TrainingError on every
        rank, and the checkpoint `latest` names stays as it was."""
        tmp = checkpointing.staging_dir(root, step)
        lead = self.rank == 0
        try:
            self._agree(step, "preparing", lambda: checkpointing.begin_checkpoint(root, step) if lead else None)
            self._agree(step, "writing", lambda: self._write_part(tmp, model, optimizer, state, tokenizer))
            self._agree(step, "committing", lambda: self._commit(root, step, keep) if lead else None)
        except TrainingError:
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return checkpointing.step_dir(root, step)

    def _write_part(self, tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    tokenizer: str | Path | None) -> None:
        """This rank's files: on EP rank r of the first replica the shards of its experts and
        their optimizer state; on rank 0 also everything replicated and trainer.pt."""
        from moge.checkpoint.save import save_expert_parallel_part

        ep, ep_rank = self.mesh.ep, self.mesh.ep_rank
        if self.rank >= ep:  # another replica holds the same tensors
            return
        save_expert_parallel_part(model, tmp, ep=ep, ep_rank=ep_rank)
        sharded = {name: (self.mesh.expert_range(len(p) * ep), len(p) * ep)
                   for name, p in model.named_parameters() if is_expert_param(name)}
        files = [checkpointing.expert_part_name(r, ep) for r in range(ep)] if sharded else []
        rest, part = checkpointing.split_optimizer_state(optimizer_state_by_name(optimizer, model), sharded, files)
        if sharded:
            torch.save(part, tmp / checkpointing.expert_part_name(ep_rank, ep))
        if self.rank == 0:
            checkpointing.copy_tokenizer(tokenizer, tmp)
            torch.save(state | {"optimizer_by_name": rest}, tmp / checkpointing.TRAINER_STATE)

    def _commit(self, root: Path, step: int, keep: int) -> None:
        """Rank 0: check that it sees every file the other ranks wrote (the run directory must be
        on a filesystem they share), then commit."""
        from moge.checkpoint import INDEX_NAME

        tmp = checkpointing.staging_dir(root, step)
        files = set(json.loads((tmp / INDEX_NAME).read_text())["weight_map"].values())
        saved = torch.load(tmp / checkpointing.TRAINER_STATE, weights_only=True, map_location="cpu", mmap=True)
        files |= set(saved["optimizer_by_name"].get("expert_parts", {}).get("files", []))
        absent = sorted(f for f in files if not (tmp / f).is_file())
        if absent:
            raise TrainingError(f"rank 0 does not see {absent} in {tmp}, written by the other ranks: the run "
                                f"directory (--out) must be on a filesystem every rank shares")
        checkpointing.commit_checkpoint(root, step, keep)

    def _agree(self, step: int, what: str, action: Callable[[], object]) -> None:
        """Run `action` on this rank, then learn every rank's outcome (collective): if any failed,
        every rank raises the same TrainingError naming the ranks and their errors."""
        try:
            action()
            mine = None
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised everywhere as one error
            mine = f"{type(e).__name__}: {e}"
        outcomes: list[str | None] = [None] * self.world
        dist.all_gather_object(outcomes, mine)
        failed = [f"rank {r}: {msg}" for r, msg in enumerate(outcomes) if msg is not None]
        if failed:
            raise TrainingError(f"saving the checkpoint of step {step} failed while {what} ({'; '.join(failed)}); "
                                f"nothing was committed: the latest checkpoint is unchanged")

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, state: dict) -> None:
        """Read this rank's share of the checkpoint (its experts and the replicated parts) straight
        from the files into the sharded model; the whole model is never held."""
        from moge.parallel.load import load_shards

        if "optimizer_by_name" not in state:
            raise TrainingError(f"{path}/trainer.pt predates expert-parallel checkpoints; resume it with a "
                                f"single process first")
        load_shards(model, path)
        saved = read_optimizer_state(path, state["optimizer_by_name"], lambda _name, rows: self.mesh.expert_range(rows))
        load_optimizer_state_by_name(optimizer, model, saved, self._local)

    def _local(self, name: str, value: Tensor, param: nn.Parameter) -> Tensor:
        """This rank's experts of a whole model's expert state (saved at any EP size)."""
        if is_expert_param(name) and value.shape[0] != param.shape[0] and \
                value.shape[0] == param.shape[0] * self.mesh.ep:
            experts = self.mesh.expert_range(value.shape[0])
            return value[experts.start:experts.stop]
        return value

    def barrier(self) -> None:
        dist.barrier()
