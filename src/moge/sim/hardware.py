"""Hardware profiles: what one device can compute, store and send, read from JSON data files.

The numbers live in `sim/hardware/*.json` (one file per product) so that they can be checked
against their sources and overridden without touching code. Every number may be written plainly
or as `{"value": x, "source": "...", "uncertain": true}`; the loader keeps the source notes and
the list of uncertain fields so reports can say which inputs are guesses.

Efficiency factors (how much of the peak a real kernel reaches) are not hardware facts: they are
fitted to measured points and stored in `sim/hardware/_calibration.json`. A profile names the
fitted set it uses with `"efficiency_from"`, or carries its own `"efficiency"` block.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moge.errors import ConfigError, MissingFileError

HARDWARE_DIR = Path(__file__).with_name("hardware")
CALIBRATION_FILE = HARDWARE_DIR / "_calibration.json"
TOPOLOGIES = ("full_mesh", "switch", "pcie", "ring")
GIB = 1024**3


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of each peak, and a fixed cost per launched operator.

    compute         fraction of peak FLOP/s that GEMMs and attention reach
    memory          fraction of memory bandwidth that weight and KV-cache streaming reach
    link            fraction of link bandwidth that collectives reach
    op_overhead_us  fixed time per operator (launch, synchronisation, short-kernel tail)
    """

    compute: float = 0.6
    memory: float = 0.8
    link: float = 0.7
    op_overhead_us: float = 10.0
    name: str = "prior"

    def __post_init__(self) -> None:
        for f in ("compute", "memory", "link"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ConfigError(f"efficiency.{f}={v!r} is invalid: must be a fraction in (0, 1]")
        if not (isinstance(self.op_overhead_us, (int, float)) and self.op_overhead_us >= 0):
            raise ConfigError(f"efficiency.op_overhead_us={self.op_overhead_us!r} is invalid: must be >= 0")

    def as_dict(self) -> dict[str, float]:
        return {"compute": self.compute, "memory": self.memory, "link": self.link,
                "op_overhead_us": self.op_overhead_us}


@dataclass(frozen=True)
class LinkLevel:
    """One level of the interconnect: groups of up to `devices` devices joined by one fabric.

    bandwidth_GBps is per device and per direction. For a full mesh it is the sum over the
    device's links to all other members of the level, so a sub-group of p devices uses only
    (p-1)/(devices-1) of it.
    """

    name: str
    devices: int
    topology: str
    bandwidth_GBps: float
    latency_us: float

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"interconnect[{self.name}].topology={self.topology!r} is invalid: "
                             f"choose one of {TOPOLOGIES}")
        if not (isinstance(self.devices, int) and self.devices >= 1):
            raise ConfigError(f"interconnect[{self.name}].devices={self.devices!r} is invalid: "
                             "must be a positive integer")
        if not self.bandwidth_GBps > 0:
            raise ConfigError(f"interconnect[{self.name}].bandwidth_GBps={self.bandwidth_GBps!r} is invalid: "
                             "must be > 0")
        if not self.latency_us >= 0:
            raise ConfigError(f"interconnect[{self.name}].latency_us={self.latency_us!r} is invalid: must be >= 0")


@dataclass(frozen=True)
class HardwareProfile:
    """One device type (an NPU or GPU chip) and the fabric around it."""

    name: str
    peak_tflops: dict[str, float]
    memory_gib: float
    memory_bandwidth_GBps: float
    links: tuple[LinkLevel, ...]
    efficiency: Efficiency = Efficiency()
    devices_per_card: int = 1
    devices_per_node: int = 8
    reserved_memory_gib: float = 0.0
    description: str = ""
    vendor: str = ""
    family: str = ""
    uncertain: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    path: str = ""

    def __post_init__(self) -> None:
        for dtype, v in self.peak_tflops.items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{self.name}: peak_tflops.{dtype}={v!r} is invalid: must be > 0")
        for f in ("memory_gib", "memory_bandwidth_GBps"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{self.name}: {f}={v!r} is invalid: must be > 0")
        if not self.links:
            raise ConfigError(f"{self.name}: interconnect is empty: give at least one link level")
        sizes = [lv.devices for lv in self.links]
        if sizes != sorted(sizes):
            raise ConfigError(f"{self.name}: interconnect levels must be listed innermost first "
                             f"(increasing devices), got {sizes}")
        if not (isinstance(self.devices_per_card, int) and self.devices_per_card >= 1):
            raise ConfigError(f"{self.name}: devices_per_card={self.devices_per_card!r} is invalid: "
                             "must be a positive integer")

    # ---- derived quantities ---------------------------------------------------------------
    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s (or OP/s) for a GEMM input dtype; bf16 and fp16 fall back to each other."""
        table = self.peak_tflops
        for key in (dtype, {"bf16": "fp16", "fp16": "bf16"}.get(dtype, dtype)):
            if key in table:
                return table[key] * 1e12
        raise ConfigError(f"{self.name}: no peak_tflops for dtype {dtype!r} (has {sorted(table)})")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def usable_memory_bytes(self) -> float:
        return (self.memory_gib - self.reserved_memory_gib) * GIB

    @property
    def memory_Bps(self) -> float:
        return self.memory_bandwidth_GBps * 1e9

    def level_for(self, span: int) -> LinkLevel:
        """The innermost link level whose groups hold `span` consecutive devices."""
        for level in self.links:
            if span <= level.devices:
                return level
        return self.links[-1]

    def scaled(self, compute: float = 1.0, memory_bandwidth: float = 1.0, link_bandwidth: float = 1.0,
               memory_capacity: float = 1.0) -> "HardwareProfile":
        """A what-if copy with some capabilities multiplied (used by tests and sweeps)."""
        links = tuple(dataclasses.replace(lv, bandwidth_GBps=lv.bandwidth_GBps * link_bandwidth)
                      for lv in self.links)
        return dataclasses.replace(
            self, peak_tflops={k: v * compute for k, v in self.peak_tflops.items()},
            memory_bandwidth_GBps=self.memory_bandwidth_GBps * memory_bandwidth,
            memory_gib=self.memory_gib * memory_capacity, links=links)

    def with_efficiency(self, efficiency: Efficiency) -> "HardwareProfile":
        return dataclasses.replace(self, efficiency=efficiency)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "devices_per_card": self.devices_per_card,
                "peak_tflops": dict(self.peak_tflops), "memory_gib": self.memory_gib,
                "memory_bandwidth_GBps": self.memory_bandwidth_GBps,
                "links": [dataclasses.asdict(lv) for lv in self.links],
                "efficiency": {**self.efficiency.as_dict(), "from": self.efficiency.name},
                "uncertain": list(self.uncertain)}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _value(raw: Any, where: str, uncertain: list[str], sources: dict[str, str]) -> Any:
    """Unwrap `{"value": x, "source": ..., "uncertain": ...}` and record the notes."""
    if isinstance(raw, dict) and "value" in raw:
        if raw.get("uncertain"):
            uncertain.append(where)
        if raw.get("source"):
            sources[where] = str(raw["source"])
        return raw["value"]
    return raw


def _number(raw: Any, where: str, uncertain: list[str], sources: dict[str, str]) -> float:
    v = _value(raw, where, uncertain, sources)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}={v!r} is invalid: must be a finite number")
    return float(v)


def load_calibration(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The fitted efficiency sets, by name."""
    path = Path(path) if path is not None else CALIBRATION_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"calibration file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    sets = data.get("sets") if isinstance(data, dict) else None
    if not isinstance(sets, dict):
        raise ConfigError(f"{path}: expected an object with a 'sets' mapping of name -> factors")
    return sets


def efficiency_from_set(name: str, calibration: str | Path | None = None) -> Efficiency:
    sets = load_calibration(calibration)
    if name not in sets:
        raise ConfigError(f"efficiency_from={name!r} is invalid: the calibration file has {sorted(sets)}")
    s = sets[name]
    return Efficiency(compute=float(s["compute"]), memory=float(s["memory"]), link=float(s["link"]),
                      op_overhead_us=float(s["op_overhead_us"]), name=name)


def profile_from_dict(data: dict, source: str = "<dict>", calibration: str | Path | None = None) -> HardwareProfile:
    """Build a profile from the JSON layout described in the module docstring."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a hardware profile must be a JSON object")
    uncertain: list[str] = []
    sources: dict[str, str] = {}
    name = str(data.get("name") or Path(source).stem)
    for key in ("peak_tflops", "memory_gib", "memory_bandwidth_GBps", "interconnect"):
        if key not in data:
            raise ConfigError(f"{source}: hardware profile field {key!r} is missing")
    peaks_raw = data["peak_tflops"]
    if not isinstance(peaks_raw, dict) or not peaks_raw:
        raise ConfigError(f"{source}: peak_tflops must map dtype -> TFLOPS, e.g. {{\"bf16\": 989}}")
    peaks = {k: _number(v, f"peak_tflops.{k}", uncertain, sources) for k, v in peaks_raw.items()}
    links = []
    for i, lv in enumerate(data["interconnect"]):
        lname = str(lv.get("name", f"level{i}"))
        for key in ("devices", "topology", "bandwidth_GBps", "latency_us"):
            if key not in lv:
                raise ConfigError(f"{source}: interconnect[{lname}].{key} is missing")
        links.append(LinkLevel(
            name=lname, devices=int(_number(lv["devices"], f"interconnect.{lname}.devices", uncertain, sources)),
            topology=str(lv["topology"]),
            bandwidth_GBps=_number(lv["bandwidth_GBps"], f"interconnect.{lname}.bandwidth_GBps", uncertain, sources),
            latency_us=_number(lv["latency_us"], f"interconnect.{lname}.latency_us", uncertain, sources)))
    if "efficiency" in data:
        eff_raw = data["efficiency"]
        eff = Efficiency(**{k: float(_value(v, f"efficiency.{k}", uncertain, sources))
                            for k, v in eff_raw.items() if k in ("compute", "memory", "link", "op_overhead_us")},
                         name=f"{name} (inline)")
    elif "efficiency_from" in data:
        eff = efficiency_from_set(str(data["efficiency_from"]), calibration)
    else:
        eff = Efficiency()
        uncertain.append("efficiency (prior, not fitted)")

    def opt(key: str, default: float) -> float:
        return _number(data[key], key, uncertain, sources) if key in data else default

    return HardwareProfile(
        name=name, peak_tflops=peaks,
        memory_gib=_number(data["memory_gib"], "memory_gib", uncertain, sources),
        memory_bandwidth_GBps=_number(data["memory_bandwidth_GBps"], "memory_bandwidth_GBps", uncertain, sources),
        links=tuple(links), efficiency=eff,
        devices_per_card=int(opt("devices_per_card", 1)), devices_per_node=int(opt("devices_per_node", 8)),
        reserved_memory_gib=opt("reserved_memory_gib", 0.0),
        description=str(data.get("description", "")), vendor=str(data.get("vendor", "")),
        family=str(data.get("family", "")), uncertain=tuple(uncertain), sources=sources, path=source)


def list_hardware() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.json") if not p.name.startswith("_"))


def load_hardware(name_or_path: str | Path, calibration: str | Path | None = None) -> HardwareProfile:
    """A shipped profile by name (see `list_hardware`) or a path to a user JSON file."""
    key = str(name_or_path)
    path = HARDWARE_DIR / f"{key}.json"
    if key.startswith("_") or not path.exists():
        path = Path(key)
        if not path.exists():
            raise ConfigError(f"hardware={key!r} is neither a shipped profile ({', '.join(list_hardware())}) "
                             "nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"hardware profile {path} is not valid JSON: {e}") from None
    return profile_from_dict(data, source=str(path), calibration=calibration)
