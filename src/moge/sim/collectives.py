"""Alpha-beta cost of collectives on one interconnect level.

time = steps * latency + wire_bytes / (link_efficiency * bandwidth_per_device)

bandwidth_per_device is the level's figure over `shared_by` (devices behind one port).

`size_bytes` is the full tensor each device holds at the large end of the operation: the input of
an all-reduce or reduce-scatter, the output of an all-gather. For all-to-all it is the bytes a
device sends to other devices. A collective whose group crosses several levels is costed on the
outermost level it touches (its slowest link); hierarchical algorithms are not modelled.

Wire bytes per device (p devices): reduce-scatter and all-gather (p-1)/p * S, all-reduce twice
that. Steps: full mesh and switch fabrics use direct algorithms (one step per phase on a mesh,
log2(p) on a switch); PCIe trees and inter-node rings use rings (p-1 steps per phase). On a full
mesh a sub-group of p devices owns only p-1 of the level's links, so its bandwidth is
(p-1)/(devices-1) of the per-device total.
"""

from __future__ import annotations

import math

from moge.errors import ConfigError
from moge.sim.hardware import LinkLevel

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


def effective_bandwidth_Bps(level: LinkLevel, group_size: int, link_efficiency: float) -> float:
    bw = level.device_bandwidth_GBps * 1e9 * link_efficiency
    if level.topology == "full_mesh" and level.devices > 1:
        bw *= min(group_size - 1, level.devices - 1) / (level.devices - 1)
    return bw


def latency_steps(kind: str, level: LinkLevel, p: int) -> int:
    if kind == "p2p":
        return 1
    if level.topology == "full_mesh":
        phase = 1
    elif level.topology == "switch":
        phase = max(1, math.ceil(math.log2(p)))
    else:
        phase = p - 1
    if kind == "all_to_all":
        return 1 if level.topology in ("full_mesh", "switch") else p - 1
    return 2 * phase if kind == "all_reduce" else phase


def collective_time_s(kind: str, size_bytes: float, group_size: int, level: LinkLevel,
                      link_efficiency: float) -> float:
    """Seconds for one collective of `size_bytes` (see module doc) over `group_size` devices."""
    if kind not in COLLECTIVES:
        raise ConfigError(f"collective={kind!r} is invalid: choose one of {COLLECTIVES}")
    if group_size <= 1 or size_bytes <= 0:
        return 0.0
    p = group_size
    if kind == "all_reduce":
        wire = 2 * (p - 1) / p * size_bytes
    elif kind in ("reduce_scatter", "all_gather"):
        wire = (p - 1) / p * size_bytes
    else:
        wire = size_bytes
    bw = effective_bandwidth_Bps(level, p, link_efficiency)
    return latency_steps(kind, level, p) * level.latency_us * 1e-6 + wire / bw
