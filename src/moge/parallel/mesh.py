"""Process groups and expert placement.

Data x expert parallel (training and EP inference): every one of the W ranks is a data-parallel
rank with its own tokens; the experts are split over `ep` consecutive ranks, so the world is W/ep
copies of the experts. Rank r has expert-parallel rank r % ep inside the EP group
{r - r % ep, ..., r - r % ep + ep - 1}, and its expert shard is replicated on the ranks with the same
EP rank (its replica group). Placement is contiguous, as in the release: expert group g lives on EP
rank g * ep / M, i.e. experts [e * N/ep, (e+1) * N/ep) on EP rank e. For MoGE, ep must divide M so
each rank owns whole groups; that is what makes every rank's share of the work known in advance.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from moge.config import MoEConfig, divisors


def check_expert_parallel(cfg: MoEConfig, ep: int) -> None:
    """Reject expert-parallel sizes that cannot split this layer's experts (errors name the value)."""
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"expert_parallel={ep!r} is invalid: must be a positive integer")
    if cfg.num_experts % ep:
        raise ValueError(f"expert_parallel={ep} must divide num_experts={cfg.num_experts} "
                         f"(valid: {divisors(cfg.num_experts)})")
    if cfg.router in ("grouped", "group_limited") and cfg.num_groups % ep:
        raise ValueError(f"expert_parallel={ep} must divide num_groups={cfg.num_groups} so each rank owns "
                         f"whole expert groups (valid: {divisors(cfg.num_groups)})")
    if cfg.expert_to_group is not None:
        raise ValueError("expert_parallel needs contiguous expert groups (expert_to_group=None): groups are "
                         "placed on ranks by expert index")


@dataclass
class ExpertParallelMesh:
    """The groups one rank needs for data x expert parallelism (see the module docstring)."""

    world: int
    rank: int
    ep: int
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def replicas(self) -> int:
        return self.world // self.ep

    @classmethod
    def build(cls, ep: int, timeout_s: float | None = None) -> "ExpertParallelMesh":
        """Create the groups from the initialised default process group. Every rank must call this
        with the same `ep` (group creation is collective). The groups' collectives fail after
        `timeout_s` (default: the timeout the world was started with by moge.parallel.launch)."""
        from moge.parallel.launch import group_timeout

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: start with torchrun (see the README) or "
                               "call moge.parallel.launch.init_distributed() first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if not isinstance(ep, int) or ep < 1 or world % ep:
            raise ValueError(f"expert_parallel={ep!r} must divide the world size {world} "
                             f"(valid: {divisors(world)})")
        ep_lists = [list(range(s, s + ep)) for s in range(0, world, ep)]
        replica_lists = [list(range(e, world, ep)) for e in range(ep)]
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else group_timeout()
        ep_group, _ = dist.new_subgroups_by_enumeration(ep_lists, timeout=timeout)
        replica_group, _ = dist.new_subgroups_by_enumeration(replica_lists, timeout=timeout)
        return cls(world, rank, ep, ep_group, replica_group)

    def expert_range(self, num_experts: int) -> range:
        """The global expert ids this rank owns."""
        per_rank = num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

