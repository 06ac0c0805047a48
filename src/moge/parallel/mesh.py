"""Device meshes for the parallel plans, built with torch's `init_device_mesh` (named dimensions).

Data x expert parallel (training and EP inference): every one of the W ranks is a data-parallel
rank with its own tokens; the experts are split over `ep` consecutive ranks, so the world is W/ep
copies of the experts: a ("dp", "ep") mesh. Rank r has expert-parallel rank r % ep inside the EP group
{r - r % ep, ..., r - r % ep + ep - 1}, and its expert shard is replicated on the ranks with the same
EP rank (its replica group, the "dp" dimension). Placement is contiguous, as in the release: expert
group g lives on EP rank g * ep / M, i.e. experts [e * N/ep, (e+1) * N/ep) on EP rank e (the rules on
`ep` are moge.degrees.check_expert_parallel).

H2P: attention is ("attn_dp", "attn_tp"), heads split over `attn_tp` consecutive ranks; the experts
and the shared expert use the whole world (every rank sees every token), so they need no group.

Every group keeps the world's timeout (torch would give sub-groups its 30-minute default, which
makes a dead peer look like a hang).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moge.degrees import check_divides_world, check_expert_parallel

__all__ = ["ExpertParallelMesh", "H2PMesh", "check_expert_parallel", "device_mesh"]


def _require_distributed() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: start with torchrun (see the README) or "
                           "call moge.parallel.launch.init_distributed() first")


def device_mesh(shape: tuple[int, ...], names: tuple[str, ...], timeout_s: float | None = None) -> DeviceMesh:
    """`init_device_mesh` over the default group's devices, every dimension's groups with the world's
    timeout (or `timeout_s`). Collective: every rank calls it with the same arguments."""
    import datetime

    from moge.parallel.launch import group_timeout

    backend = dist.get_backend()
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else group_timeout()
    override = None
    if timeout is not None:
        options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        override = {name: (backend, options) for name in names}
    device = "cuda" if backend == "nccl" else "cpu"
    return init_device_mesh(device, shape, mesh_dim_names=names, backend_override=override)


@dataclass
class ExpertParallelMesh:
    """The groups one rank needs for data x expert parallelism (see the module docstring)."""

    world: int
    rank: int
    ep: int
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    mesh: DeviceMesh | None = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def replicas(self) -> int:
        return self.world // self.ep

    @classmethod
    def build(cls, ep: int, timeout_s: float | None = None) -> "ExpertParallelMesh":
        """Create the ("dp", "ep") mesh from the initialised default process group. Every rank must
        call this with the same `ep` (group creation is collective). The groups' collectives fail
        after `timeout_s` (default: the timeout the world was started with)."""
        _require_distributed()
        world, rank = dist.get_world_size(), dist.get_rank()
        check_divides_world("expert_parallel", ep, world)
        mesh = device_mesh((world // ep, ep), ("dp", "ep"), timeout_s)
        return cls(world, rank, ep, mesh["ep"].get_group(), mesh["dp"].get_group(), mesh)

    def expert_range(self, num_experts: int) -> range:
        """The global expert ids this rank owns."""
        per_rank = num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


@dataclass
class H2PMesh:
    """The H2P layout's groups for one rank: attention TP over `attn_tp` consecutive ranks; the MoE
    part communicates over the whole world (`world_group`, None = the default group)."""

    world: int
    rank: int
    attn_tp: int
    attn_group: dist.ProcessGroup | None
    world_group: dist.ProcessGroup | None = None
    mesh: DeviceMesh | None = None

    @property
    def attn_rank(self) -> int:
        return self.rank % self.attn_tp

    @classmethod
    def build(cls, attn_tp: int, timeout_s: float | None = None) -> "H2PMesh":
        """Create the ("attn_dp", "attn_tp") mesh (collective: every rank calls it alike)."""
        _require_distributed()
        world, rank = dist.get_world_size(), dist.get_rank()
        check_divides_world("attn_tp", attn_tp, world)
        mesh = device_mesh((world // attn_tp, attn_tp), ("attn_dp", "attn_tp"), timeout_s)
        return cls(world, rank, attn_tp, mesh["attn_tp"].get_group(), dist.group.WORLD, mesh)
