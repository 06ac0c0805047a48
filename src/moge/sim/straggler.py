"""Straggler model: how busy the busiest expert-parallel device is, from a Monte Carlo of routing.

Under expert parallelism the routed-expert part of a step ends when the busiest device finishes.
Two numbers per device decide its time: the token-expert assignments it computes (the GEMM
FLOPs) and the number of distinct local experts that received at least one token (the expert
weights it must read). Both are random; the step waits for their expected maximum over devices.

Routing models (`parse_routing`):
    auto          MoGE for a grouped-router model, uniform top-K otherwise
    uniform       each token picks K distinct experts uniformly (conventional top-K)
    moge          K/G experts inside each of G contiguous groups (experts placed contiguously)
    zipf:S        top-K with expert popularity proportional to 1/rank^S (random ranks, seeded)
    moge-zipf:S   MoGE with the same skew inside groups
    trace:FILE    a measured trace: JSON or .npy of expert ids [T, K] (tokens are resampled)
                  or of per-expert counts [N] (used as popularity weights)

The Monte Carlo (built on moge.metrics) runs once per (routing, N, K, groups), for all EP sizes, over
a fixed grid of token counts and is cached; other token counts are interpolated (linearly, which
keeps the expected maxima non-decreasing in tokens); beyond the grid the busiest device keeps the
max/mean ratio of the last grid point (slightly pessimistic for unskewed routing, right for a
persistent skew).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moge.config import ModelConfig
from moge.errors import ConfigError, MissingFileError
from moge.metrics import contiguous_device_map, expert_counts, sample_experts

TOKEN_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)
_ELEMENT_BUDGET = 300_000  # random keys drawn per grid point (trials * tokens * experts)
_MAX_TRIALS = 600
_MIN_TRIALS = 2


@dataclass(frozen=True)
class RoutingModel:
    kind: str  # uniform | moge | zipf | moge-zipf | trace
    zipf_s: float = 0.0
    trace: str | None = None
    seed: int = 0

    @property
    def grouped(self) -> bool:
        return self.kind in ("moge", "moge-zipf")

    def label(self) -> str:
        if self.kind in ("zipf", "moge-zipf"):
            return f"{self.kind}:{self.zipf_s:g}"
        if self.kind == "trace":
            return f"trace:{self.trace}"
        return self.kind


ROUTING_HELP = "auto | uniform | moge | zipf:S | moge-zipf:S | trace:FILE (.json/.npy of ids [T,K] or counts [N])"


def parse_routing(spec: str, model: ModelConfig, seed: int = 0) -> RoutingModel | None:
    """The routing model for `spec` (see module doc); None for a dense model."""
    if not model.is_moe:
        return None
    spec = spec.strip()
    if spec == "auto":
        spec = "moge" if model.router == "grouped" else "uniform"
    if spec in ("uniform", "topk"):
        return RoutingModel("uniform", seed=seed)
    if spec == "moge":
        _check_groups(model)
        return RoutingModel("moge", seed=seed)
    for prefix in ("moge-zipf", "zipf"):
        if spec == prefix or spec.startswith(prefix + ":"):
            s_text = spec.split(":", 1)[1] if ":" in spec else "1.0"
            try:
                s = float(s_text)
            except ValueError:
                raise ConfigError(f"routing={spec!r} is invalid: the Zipf exponent {s_text!r} "
                                  "is not a number") from None
            if s < 0:
                raise ConfigError(f"routing={spec!r} is invalid: the Zipf exponent must be >= 0")
            if prefix == "moge-zipf":
                _check_groups(model)
            return RoutingModel(prefix, zipf_s=s, seed=seed)
    if spec.startswith("trace:"):
        path = spec.split(":", 1)[1]
        _load_trace(path, model.num_experts, model.top_k)  # validate now, with a clear error
        return RoutingModel("trace", trace=str(Path(path).resolve()), seed=seed)
    raise ConfigError(f"routing={spec!r} is invalid: choose one of {ROUTING_HELP}")


def _check_groups(model: ModelConfig) -> None:
    n, k, g = model.num_experts, model.top_k, model.num_groups
    if n % g or k % g:
        raise ConfigError(f"routing='moge' needs num_groups={g} to divide num_experts={n} and top_k={k}")


@functools.lru_cache(maxsize=16)
def _load_trace(path: str, num_experts: int, top_k: int) -> tuple[str, torch.Tensor]:
    """('ids', [T, K] long) or ('counts', [N] float) from a JSON or .npy file."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"routing trace not found: {p}")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"routing trace {p} is not valid JSON: {e}") from None
        if isinstance(data, dict):
            for key in ("expert_ids", "experts", "counts", "expert_counts"):
                if key in data:
                    data = data[key]
                    break
            else:
                raise ConfigError(f"routing trace {p}: expected a list, or an object with 'expert_ids' or 'counts'")
        arr = np.asarray(data)
    if arr.ndim == 2:
        if arr.shape[1] != top_k or arr.shape[0] == 0:
            raise ConfigError(f"routing trace {p}: expert ids have shape {tuple(arr.shape)}, expected [T>0, "
                             f"top_k={top_k}]")
        ids = torch.as_tensor(arr.astype(np.int64))
        if ids.min() < 0 or ids.max() >= num_experts:
            raise ConfigError(f"routing trace {p}: expert ids must lie in [0, num_experts={num_experts})")
        return "ids", ids
    if arr.ndim == 1:
        if arr.shape[0] != num_experts:
            raise ConfigError(f"routing trace {p}: {arr.shape[0]} per-expert counts, expected num_experts="
                             f"{num_experts}")
        w = torch.as_tensor(arr.astype(np.float64), dtype=torch.float32)
        if torch.any(w < 0) or not w.sum() > 0:
            raise ConfigError(f"routing trace {p}: counts must be non-negative with a positive sum")
        return "counts", w
    raise ConfigError(f"routing trace {p}: expected a 2-D array of expert ids or a 1-D array of counts, "
                     f"got {arr.ndim}-D")


def _zipf_weights(n: int, s: float, seed: int) -> torch.Tensor:
    ranks = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) + 1
    return ranks.float().pow(-s)


@dataclass(frozen=True)
class LoadStats:
    """Expected per-device expert work for `tokens` tokens routed over `ep` devices."""

    tokens: int
    ep: int
    mean_load: float  # token-expert assignments per device (T*K/ep)
    max_load: float  # E[max over devices]
    max_active_experts: float  # E[max over devices of local experts with >= 1 token]
    mean_active_experts: float
    devices_per_token: float  # E[distinct devices holding a token's K experts]

    @property
    def straggler_factor(self) -> float:
        return self.max_load / self.mean_load if self.mean_load else 1.0


def _sampler(routing: RoutingModel, n: int, k: int, groups: int):
    gen = torch.Generator().manual_seed(routing.seed + 1)
    if routing.kind == "trace":
        mode, data = _load_trace(routing.trace, n, k)
        if mode == "ids":
            def draw(trials: int, tokens: int) -> torch.Tensor:
                rows = torch.randint(data.shape[0], (trials, tokens), generator=gen)
                return data[rows]
            return draw
        weights, grouped = data, False
    else:
        weights = _zipf_weights(n, routing.zipf_s, routing.seed) if routing.kind.endswith("zipf") else None
        grouped = routing.grouped

    def draw(trials: int, tokens: int) -> torch.Tensor:
        return sample_experts(trials, tokens, n, k, num_groups=groups if grouped else None,
                              expert_weights=weights, generator=gen)
    return draw


@functools.lru_cache(maxsize=32)
def _draws(routing: RoutingModel, n: int, k: int, groups: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-expert token counts [trials, N] for every point of TOKEN_GRID, and a sample of
    tokens' expert ids [<=20000, K]. Drawn once per routing model and shared by all EP sizes."""
    draw = _sampler(routing, n, k, groups)
    counts, sample = [], None
    for tokens in TOKEN_GRID:
        trials = int(min(_MAX_TRIALS, max(_MIN_TRIALS, _ELEMENT_BUDGET // (tokens * n))))
        ex = draw(trials, tokens)  # [trials, T, K]
        counts.append(expert_counts(ex, n).numpy())
        if sample is None and trials * tokens >= 2000:
            sample = ex.reshape(-1, k)[:20_000].numpy()
    return counts, sample


@functools.lru_cache(maxsize=256)
def _grid(routing: RoutingModel, n: int, k: int, groups: int, ep: int) -> dict:
    """E[max load], E[max active experts], E[mean active experts] over TOKEN_GRID, devices/token."""
    counts, sample = _draws(routing, n, k, groups)
    max_load, max_active, mean_active = [], [], []
    for c in counts:
        per_dev = c.reshape(c.shape[0], ep, n // ep)  # experts sit contiguously on devices
        loads = per_dev.sum(-1)  # == moge.metrics.device_loads(ex, contiguous_device_map(n, ep), ep)
        active = (per_dev > 0).sum(-1)
        max_load.append(float(loads.max(-1).mean()))
        max_active.append(float(active.max(-1).mean()))
        mean_active.append(float(active.mean()))
    d = np.sort(contiguous_device_map(n, ep).numpy()[sample], axis=-1)
    dpt = float((1 + (d[:, 1:] != d[:, :-1]).sum(-1)).mean())
    # Monte Carlo noise must not make more tokens look cheaper: enforce monotone grids.
    return {"max_load": np.maximum.accumulate(np.array(max_load)),
            "max_active": np.minimum(np.maximum.accumulate(np.array(max_active)), n // ep),
            "mean_active": np.minimum(np.maximum.accumulate(np.array(mean_active)), n // ep),
            "devices_per_token": dpt}


def load_stats(routing: RoutingModel, num_experts: int, top_k: int, num_groups: int, ep: int,
               tokens: int) -> LoadStats:
    """Expected busiest-device load and active experts for `tokens` tokens over `ep` EP devices."""
    if num_experts % ep:
        raise ConfigError(f"expert_ep={ep} must divide num_experts={num_experts}")
    tokens = max(1, int(tokens))
    mean = tokens * top_k / ep
    g = _grid(routing, num_experts, top_k, num_groups, ep)
    grid = np.array(TOKEN_GRID, dtype=float)
    if tokens <= grid[-1]:
        max_load = float(np.interp(tokens, grid, g["max_load"]))
        max_active = float(np.interp(tokens, grid, g["max_active"]))
        mean_active = float(np.interp(tokens, grid, g["mean_active"]))
    else:
        ratio = float(g["max_load"][-1]) / (grid[-1] * top_k / ep)
        max_load = mean * ratio
        max_active = float(g["max_active"][-1])
        mean_active = float(g["mean_active"][-1])
    return LoadStats(tokens=tokens, ep=ep, mean_load=mean, max_load=max(mean, max_load),
                     max_active_experts=max_active, mean_active_experts=mean_active,
                     devices_per_token=float(g["devices_per_token"]))


def clear_cache() -> None:
    _grid.cache_clear()
    _draws.cache_clear()
    _load_trace.cache_clear()
