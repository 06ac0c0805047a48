"""Which parallel degrees a model can take: the one set of rules the runtime (moge.parallel) and
the deployment simulator (moge.sim.plans) both apply, so a plan the simulator prices is a plan the
runtime runs.

Each check raises `ConfigError` naming the degree, its value and the valid values. Placement is
contiguous, as in the release: with `ep` expert-parallel ranks, rank e owns experts
[e * N/ep, (e+1) * N/ep). For MoGE (and group-limited routing) `ep` must divide the number of groups
so that every rank owns whole groups - that is what makes each rank's share of the work known in
advance. Attention tensor parallelism splits query and KV heads alike, so it must divide both (KV
heads are not replicated across ranks).
"""

from __future__ import annotations

from moge.config import ModelConfig, MoEConfig, divisors
from moge.errors import ConfigError

GROUPED_ROUTERS = ("grouped", "group_limited")


def check_degree(name: str, value: object) -> int:
    """A parallel degree is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: must be a positive integer")
    return value


def check_divides_world(name: str, value: int, world: int) -> None:
    """A degree that splits `world` processes into equal groups."""
    check_degree(name, value)
    if world % value:
        raise ConfigError(f"{name}={value} is invalid: must divide the world size {world} (valid: {divisors(world)})")


def check_expert_parallel(cfg: MoEConfig | ModelConfig, ep: int, name: str = "expert_parallel") -> None:
    """Routed experts split over `ep` ranks, contiguously; whole groups per rank for grouped routers."""
    check_degree(name, ep)
    moe = cfg.moe() if isinstance(cfg, ModelConfig) else cfg
    if moe.num_experts % ep:
        raise ConfigError(f"{name}={ep} is invalid: must divide num_experts={moe.num_experts} "
                          f"(valid: {divisors(moe.num_experts)})")
    if moe.router in GROUPED_ROUTERS and moe.num_groups % ep:
        raise ConfigError(f"{name}={ep} is invalid: must divide num_groups={moe.num_groups} so each rank owns "
                          f"whole expert groups (valid: {divisors(moe.num_groups)})")
    if moe.expert_to_group is not None and ep > 1:
        raise ConfigError(f"{name}={ep} is invalid with an explicit expert_to_group: groups are placed on ranks "
                          "by expert index, so expert parallelism needs contiguous groups (expert_to_group=None)")


def check_attention_tp(cfg: ModelConfig, tp: int, name: str = "attn_tp") -> None:
    """Query and KV heads split over `tp` ranks."""
    check_degree(name, tp)
    for field, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads)):
        if n % tp:
            raise ConfigError(f"{name}={tp} is invalid: must divide {field}={n} (valid: "
                              f"{[d for d in divisors(cfg.num_kv_heads) if cfg.num_heads % d == 0]})")


def check_expert_tp(cfg: ModelConfig, tp: int, name: str = "expert_tp") -> None:
    """Each routed expert's intermediate width split over `tp` ranks."""
    check_degree(name, tp)
    if cfg.expert_intermediate_size % tp:
        raise ConfigError(f"{name}={tp} is invalid: must divide expert_intermediate_size="
                          f"{cfg.expert_intermediate_size} (valid: {divisors(cfg.expert_intermediate_size)})")


def check_dense_tp(cfg: ModelConfig, tp: int, name: str = "dense_tp") -> None:
    """The always-on MLP (the shared expert of an MoE model, the MLP of a dense one) split over `tp`."""
    check_degree(name, tp)
    field = "shared_expert_intermediate_size" if cfg.is_moe else "intermediate_size"
    width = getattr(cfg, field)
    if width and width % tp:
        raise ConfigError(f"{name}={tp} is invalid: must divide {field}={width} (valid: {divisors(width)})")


def check_hybrid(cfg: ModelConfig, world: int, attn_tp: int, expert_tp: int) -> int:
    """The paper's H2P layout on `world` ranks: attention DP x TP(attn_tp), routed experts
    TP(expert_tp) x EP(world / expert_tp), shared expert TP over all ranks. Returns the expert EP."""
    check_divides_world("attn_tp", attn_tp, world)
    check_divides_world("expert_tp", expert_tp, world)
    if not cfg.is_moe:
        raise ConfigError("the H2P layout needs a model with routed experts (num_experts > 0)")
    check_attention_tp(cfg, attn_tp)
    check_expert_tp(cfg, expert_tp)
    ep = world // expert_tp
    try:
        check_expert_parallel(cfg, ep, name="world/expert_tp")
    except ConfigError as e:
        valid = [world // e for e in divisors(world) if _ep_ok(cfg, e)]
        raise ConfigError(f"{e} (valid expert_tp for {world} ranks: {valid})") from None
    if cfg.shared_expert_intermediate_size <= 0:
        raise ConfigError("the H2P layout splits the shared expert over all ranks: this model has none "
                          "(shared_expert_intermediate_size=0)")
    check_dense_tp(cfg, world, name="world (shared expert TP)")
    return ep


def _ep_ok(cfg: ModelConfig, ep: int) -> bool:
    try:
        check_expert_parallel(cfg, ep)
    except ConfigError:
        return False
    return True
