"""Hardware profiles: what one device can compute, store and send, read from JSON data files.

The numbers live in `sim/hardware/*.json` (one file per product) so that they can be checked
against their sources and overridden without touching code. Every number may be written plainly
or as `{"value": x, "source": "...", "uncertain": true}`; the loader keeps the source notes and
the list of uncertain fields so reports can say which inputs are guesses.

Kernel parameters (how much of each peak a real kernel reaches, fixed costs, tile sizes) are not
hardware facts. Each profile's "kernels" block gives every one of them as a prior with a range and
a source, as fitted (the value comes from `sim/hardware/_calibration.json`, set named by
`kernels.calibration`), or as transferred from another family's fit with a factor range. A user
profile may give a plain "efficiency" block instead. The ranges feed `moge.sim.uncertainty`.
"""

from __future__ import annotations

import copy
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


# Kernel-efficiency parameters (see docs/simulator.md, "Cost model"). The first three are the only
# ones ever fitted; every other one is a prior with a documented source or a stated assumption.
FITTED = ("compute", "kv_attention", "kernel_us")
FRACTIONS = ("compute", "weight_stream", "kv_attention", "elementwise", "link", "gmm_rel", "comm_overlap")
DURATIONS = ("kernel_us", "host_us", "attn_seq_us")
SIZES = ("gmm_tile_m", "gemm_tile", "cache_mib")
KERNEL_PARAMS = FRACTIONS + DURATIONS + SIZES
_LEGACY = {"memory": ("weight_stream", "kv_attention", "elementwise"), "op_overhead_us": ("kernel_us",)}


@dataclass(frozen=True)
class Efficiency:
    """What real kernels reach on one device, one number per physical stream.

    compute        fraction of peak FLOP/s a large dense GEMM (and prefill attention) reaches   [fitted]
    weight_stream  fraction of memory bandwidth that streaming GEMM/GEMV weights reaches        [prior]
    kv_attention   fraction of memory bandwidth that decode attention reaches on the KV cache   [fitted]
    elementwise    fraction of memory bandwidth of norms, RoPE, permutes, sampling             [prior]
    link           fraction of link bandwidth that collectives reach                           [prior]
    kernel_us      device-side fixed cost of every kernel (fill, drain, sync); never hidden     [fitted]
    host_us        host-side cost to launch one kernel; hidden in graph mode                    [prior]
    attn_seq_us    attention's fixed cost per sequence per layer (block tables, split-K merge)  [prior]
    gmm_rel        grouped-GEMM compute efficiency relative to dense GEMM at many rows/expert   [prior]
    gmm_tile_m     rows of the grouped GEMM's M tile; an expert pads half a tile on average     [prior]
    gemm_tile      output-tile edge of a GEMM; an operand that does not fit in the cache is re-read
                   from DRAM once per tile of the other operand (LLMCompass-style)             [prior]
    cache_mib      on-chip memory that keeps an operand across output tiles                    [prior]
    comm_overlap   fraction of the shorter of compute/communication hidden with --overlap-comm [prior]
    """

    compute: float = 0.6
    weight_stream: float = 0.85
    kv_attention: float = 0.6
    elementwise: float = 0.7
    link: float = 0.7
    kernel_us: float = 10.0
    host_us: float = 10.0
    attn_seq_us: float = 0.2
    gmm_rel: float = 0.9
    gmm_tile_m: float = 16.0
    gemm_tile: float = 512.0
    cache_mib: float = 32.0
    comm_overlap: float = 0.7
    name: str = "prior"

    def __post_init__(self) -> None:
        for f in FRACTIONS:
            v = getattr(self, f)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ConfigError(f"efficiency.{f}={v!r} is invalid: must be a fraction in (0, 1]")
        for f in DURATIONS:
            v = getattr(self, f)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"efficiency.{f}={v!r} is invalid: must be >= 0 (microseconds)")
        for f in SIZES:
            v = getattr(self, f)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and v >= 1):
                raise ConfigError(f"efficiency.{f}={v!r} is invalid: must be >= 1 (rows)")

    def as_dict(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in KERNEL_PARAMS}


@dataclass(frozen=True)
class Prior:
    """Where one kernel parameter of a profile comes from.

    value   the point estimate (for a fitted parameter on the calibration hardware: the fit's prior)
    lo, hi  the range the uncertainty propagation samples (triangular with mode `value`)
    fitted  True: the value comes from the calibration set; on other hardware it is multiplied by a
            transfer factor in `rel` (point 1) and, with derive="weight_stream", by this profile's
            weight_stream over the calibration hardware's
    """

    value: float
    lo: float
    hi: float
    source: str = ""
    fitted: bool = False
    rel: tuple[float, float] | None = None
    derive: str = ""


@dataclass(frozen=True)
class LinkLevel:
    """One level of the interconnect: groups of up to `devices` devices joined by one fabric.

    bandwidth_GBps is per direction, for `shared_by` devices together (1 for a private link; 2 for
    the two chips of an Atlas 300I Duo card behind one PCIe x16 slot, which every chip uses at the
    same time in SPMD collectives, so each gets half). For a full mesh it is the sum over the
    device's links to all other members of the level, so a sub-group of p devices uses only
    (p-1)/(devices-1) of it.
    """

    name: str
    devices: int
    topology: str
    bandwidth_GBps: float
    latency_us: float
    shared_by: int = 1

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
        if not (isinstance(self.shared_by, int) and 1 <= self.shared_by <= self.devices):
            raise ConfigError(f"interconnect[{self.name}].shared_by={self.shared_by!r} is invalid: must be an "
                             f"integer in [1, devices={self.devices}]")

    @property
    def device_bandwidth_GBps(self) -> float:
        """Bandwidth one device gets when every device of the level sends at once."""
        return self.bandwidth_GBps / self.shared_by


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
    priors: dict[str, Prior] = field(default_factory=dict, compare=False, repr=False)
    ranges: dict[str, tuple[float, float, float]] = field(default_factory=dict, compare=False, repr=False)
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    calibration_set: str = ""

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

    def with_fitted(self, fitted: dict[str, float], rel: dict[str, float] | None = None,
                    name: str | None = None) -> "HardwareProfile":
        """This profile with the fitted parameters set from `fitted` (compute, kv_attention, kernel_us,
        and weight_stream_ref: the calibration hardware's weight_stream during the fit), applying
        each fitted parameter's transfer rule (see Prior)."""
        return self.with_efficiency(apply_fitted(self.efficiency, self.priors, fitted, rel or {},
                                                 name or self.efficiency.name))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "devices_per_card": self.devices_per_card,
                "peak_tflops": dict(self.peak_tflops), "memory_gib": self.memory_gib,
                "memory_bandwidth_GBps": self.memory_bandwidth_GBps,
                "links": [dataclasses.asdict(lv) for lv in self.links],
                "efficiency": {**self.efficiency.as_dict(), "from": self.efficiency.name},
                "uncertain": list(self.uncertain)}


def apply_fitted(eff: Efficiency, priors: dict[str, Prior], fitted: dict[str, float], rel: dict[str, float],
                 name: str) -> Efficiency:
    """Set the fitted parameters of `eff` (see HardwareProfile.with_fitted)."""
    out = {}
    for k in FITTED:
        pr = priors.get(k)
        if pr is None or not pr.fitted or k not in fitted:
            continue
        v = fitted[k] * rel.get(k, 1.0)
        if pr.derive == "weight_stream":
            v *= eff.weight_stream / fitted.get("weight_stream_ref", eff.weight_stream)
        out[k] = min(v, 1.0) if k in FRACTIONS else v
    return dataclasses.replace(eff, name=name, **out)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _Notes:
    """Collects, while a profile is read, which numbers are guesses, their sources and ranges."""

    def __init__(self) -> None:
        self.uncertain: list[str] = []
        self.sources: dict[str, str] = {}
        self.ranges: dict[str, tuple[float, float, float]] = {}

    def value(self, raw: Any, where: str) -> Any:
        """Unwrap `{"value": x, "source": ..., "uncertain": ..., "range": [lo, hi]}`."""
        if isinstance(raw, dict) and "value" in raw:
            if raw.get("uncertain"):
                self.uncertain.append(where)
            if raw.get("source"):
                self.sources[where] = str(raw["source"])
            if "range" in raw:
                lo, hi = _range(raw["range"], where)
                v = raw["value"]
                if isinstance(v, (int, float)) and not lo <= v <= hi:
                    raise ConfigError(f"{where}.range={[lo, hi]} is invalid: must contain the value {v}")
                self.ranges[where] = (lo, float(v), hi)
            return raw["value"]
        return raw

    def number(self, raw: Any, where: str) -> float:
        v = self.value(raw, where)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}={v!r} is invalid: must be a finite number")
        return float(v)


def _range(raw: Any, where: str) -> tuple[float, float]:
    ok = (isinstance(raw, (list, tuple)) and len(raw) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in raw))
    if not ok or raw[0] > raw[1]:
        raise ConfigError(f"{where}.range={raw!r} is invalid: give [low, high] with low <= high")
    return float(raw[0]), float(raw[1])


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


def fitted_from_set(name: str, calibration: str | Path | None = None) -> dict[str, float]:
    """The fitted parameters of a calibration set (and the weight_stream they were fitted with)."""
    sets = load_calibration(calibration)
    if name not in sets:
        raise ConfigError(f"calibration={name!r} is invalid: the calibration file has {sorted(sets)}")
    s = sets[name]
    try:
        return {**{k: float(s["fitted"][k]) for k in FITTED}, "weight_stream_ref": float(s["weight_stream_ref"])}
    except (KeyError, TypeError):
        raise ConfigError(f"calibration set {name!r} lacks fitted {FITTED} and weight_stream_ref: refit it with "
                          "`moge simulate --calibrate --calibration-out FILE`") from None


def _kernels(block: Any, source: str, notes: _Notes) -> tuple[dict[str, float], dict[str, Prior], str]:
    """Parse a profile's "kernels" block: each parameter a prior, a fitted value, or a transfer."""
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: kernels must be an object of parameter -> {{value, range, source}}")
    cal = str(block.get("calibration", ""))
    values: dict[str, float] = {}
    priors: dict[str, Prior] = {}
    for k, raw in block.items():
        if k == "calibration":
            continue
        where = f"kernels.{k}"
        if k not in KERNEL_PARAMS:
            raise ConfigError(f"{source}: {where} is not a kernel parameter: choose from {KERNEL_PARAMS}")
        if not isinstance(raw, dict):
            values[k] = notes.number(raw, where)
            priors[k] = Prior(values[k], values[k], values[k])
            continue
        src = str(raw.get("source", ""))
        if src:
            notes.sources[where] = src
        if raw.get("fitted"):
            if not cal:
                raise ConfigError(f"{source}: {where} is fitted but kernels.calibration names no calibration set")
            derive = str(raw.get("derive", ""))
            if derive not in ("", "weight_stream"):
                raise ConfigError(f"{source}: {where}.derive={derive!r} is invalid: choose '' or 'weight_stream'")
            rel = _range(raw["range_rel"], f"{where}.range_rel") if "range_rel" in raw else None
            if rel is not None:
                if not rel[0] <= 1 <= rel[1]:
                    raise ConfigError(f"{source}: {where}.range_rel={list(rel)} is invalid: must contain 1")
                notes.ranges[f"{where}.rel"] = (rel[0], 1.0, rel[1])
                notes.uncertain.append(where)
            v = float(raw.get("prior", getattr(Efficiency(), k)))
            lo, hi = _range(raw["range"], where) if "range" in raw else (v, v)
            priors[k] = Prior(v, lo, hi, src, fitted=True, rel=rel, derive=derive)
            values[k] = v
            continue
        for key in ("value", "range", "source"):
            if key not in raw:
                raise ConfigError(f"{source}: {where}.{key} is missing (every prior carries a value, a range "
                                  "and a source)")
        values[k] = notes.number({**raw, "uncertain": raw["range"][0] != raw["range"][1]}, where)
        lo, _, hi = notes.ranges[where]
        priors[k] = Prior(values[k], lo, hi, src)
    return values, priors, cal


def profile_from_dict(data: dict, source: str = "<dict>", calibration: str | Path | None = None,
                      fitted: dict[str, float] | None = None) -> HardwareProfile:
    """Build a profile from the JSON layout described in the module docstring.

    `fitted` overrides the calibration file's fitted parameters (the fit and the uncertainty
    propagation use it); `calibration` names another calibration file.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a hardware profile must be a JSON object")
    notes = _Notes()
    name = str(data.get("name") or Path(source).stem)
    for key in ("peak_tflops", "memory_gib", "memory_bandwidth_GBps", "interconnect"):
        if key not in data:
            raise ConfigError(f"{source}: hardware profile field {key!r} is missing")
    peaks_raw = data["peak_tflops"]
    if not isinstance(peaks_raw, dict) or not peaks_raw:
        raise ConfigError(f"{source}: peak_tflops must map dtype -> TFLOPS, e.g. {{\"bf16\": 989}}")
    peaks = {k: notes.number(v, f"peak_tflops.{k}") for k, v in peaks_raw.items()}
    links = []
    for i, lv in enumerate(data["interconnect"]):
        lname = str(lv.get("name", f"level{i}"))
        for key in ("devices", "topology", "bandwidth_GBps", "latency_us"):
            if key not in lv:
                raise ConfigError(f"{source}: interconnect[{lname}].{key} is missing")
        links.append(LinkLevel(
            name=lname, devices=int(notes.number(lv["devices"], f"interconnect.{lname}.devices")),
            topology=str(lv["topology"]),
            bandwidth_GBps=notes.number(lv["bandwidth_GBps"], f"interconnect.{lname}.bandwidth_GBps"),
            latency_us=notes.number(lv["latency_us"], f"interconnect.{lname}.latency_us"),
            shared_by=int(notes.number(lv.get("shared_by", 1), f"interconnect.{lname}.shared_by"))))
    priors: dict[str, Prior] = {}
    cal = ""
    if "kernels" in data and "efficiency" in data:
        raise ConfigError(f"{source}: give either a 'kernels' block (priors with ranges) or an 'efficiency' block, "
                          "not both")
    if "kernels" in data:
        values, priors, cal = _kernels(data["kernels"], source, notes)
        eff = Efficiency(**values, name=f"{name} priors")
        if any(p.fitted for p in priors.values()):
            fit = fitted if fitted is not None else fitted_from_set(cal, calibration)
            eff = apply_fitted(eff, priors, fit, {}, cal)
    elif "efficiency" in data:  # a plain block: any kernel parameter, or the older four-factor names
        values = {}
        for k, v in data["efficiency"].items():
            for target in _LEGACY.get(k, (k,)):
                if target not in KERNEL_PARAMS:
                    raise ConfigError(f"{source}: efficiency.{k} is not a kernel parameter: choose from "
                                      f"{KERNEL_PARAMS}")
                values[target] = float(notes.value(v, f"efficiency.{k}"))
        eff = Efficiency(**values, name=f"{name} (inline)")
        notes.uncertain.append("efficiency (inline, no ranges)")
    else:
        eff = Efficiency()
        notes.uncertain.append("efficiency (generic prior, no ranges)")

    def opt(key: str, default: float) -> float:
        return notes.number(data[key], key) if key in data else default

    return HardwareProfile(
        name=name, peak_tflops=peaks,
        memory_gib=notes.number(data["memory_gib"], "memory_gib"),
        memory_bandwidth_GBps=notes.number(data["memory_bandwidth_GBps"], "memory_bandwidth_GBps"),
        links=tuple(links), efficiency=eff,
        devices_per_card=int(opt("devices_per_card", 1)), devices_per_node=int(opt("devices_per_node", 8)),
        reserved_memory_gib=opt("reserved_memory_gib", 0.0),
        description=str(data.get("description", "")), vendor=str(data.get("vendor", "")),
        family=str(data.get("family", "")), uncertain=tuple(notes.uncertain), sources=notes.sources, path=source,
        priors=priors, ranges=notes.ranges, raw=data, calibration_set=cal)


# Numbers the uncertainty propagation varies: latency inputs only (memory sizes decide feasibility).
SAMPLED_PREFIXES = ("peak_tflops.", "memory_bandwidth_GBps", "interconnect.", "kernels.")


def sampled_ranges(hw: HardwareProfile) -> dict[str, tuple[float, float, float]]:
    """(low, point, high) of every latency input of `hw` that has a range wider than a point."""
    return {k: r for k, r in hw.ranges.items() if k.startswith(SAMPLED_PREFIXES) and r[0] < r[2]
            and not k.endswith(".devices") and not k.endswith(".shared_by")}


def perturbed(hw: HardwareProfile, values: dict[str, float], fitted: dict[str, float] | None = None,
              calibration: str | Path | None = None) -> HardwareProfile:
    """A copy of `hw` rebuilt from its JSON with some numbers replaced, by their paths in
    `hw.ranges` ("peak_tflops.int8", "interconnect.hccs.bandwidth_GBps", "kernels.weight_stream"),
    and transfer factors ("kernels.compute.rel") applied to the fitted parameters."""
    if not hw.raw:  # built in code, not from a file: nothing is ranged
        if values:
            raise ConfigError(f"{hw.name}: has no JSON source, so {sorted(values)} cannot be perturbed")
        return hw
    data = copy.deepcopy(hw.raw)
    rel = {}
    for path, v in values.items():
        parts = path.split(".")
        if parts[0] == "kernels" and len(parts) == 3 and parts[2] == "rel":
            rel[parts[1]] = v
            continue
        if parts[0] == "interconnect":
            node = next(lv for lv in data["interconnect"] if lv.get("name") == parts[1])[parts[2]]
        elif len(parts) == 2:
            node = data[parts[0]][parts[1]]
        else:
            node = data[parts[0]]
        if not isinstance(node, dict) or "value" not in node:
            raise ConfigError(f"{hw.name}: {path} is not a ranged number of the profile")
        node["value"] = v
    out = profile_from_dict(data, hw.path or hw.name, calibration, fitted)
    if rel:
        fit = fitted if fitted is not None else fitted_from_set(out.calibration_set, calibration)
        out = out.with_fitted(fit, rel)
    return out


def list_hardware() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.json") if not p.name.startswith("_"))


def load_hardware(name_or_path: str | Path, calibration: str | Path | None = None,
                  fitted: dict[str, float] | None = None) -> HardwareProfile:
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
    return profile_from_dict(data, source=str(path), calibration=calibration, fitted=fitted)
