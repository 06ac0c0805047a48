"""What a training run is: every knob in one dataclass, validated once and saved next to the
checkpoints so `--resume` continues the same run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moge.errors import ConfigError, MogeError, bad_value

AUX_SCOPES = ("micro", "global", "local")
# what a phase of a staged run may set; the rest of the run's settings hold for every phase
PHASE_KEYS = ("name", "steps", "seq_len", "batch_size", "lr", "min_lr", "warmup", "weights")


class TrainingError(MogeError, RuntimeError):
    """Training cannot continue (non-finite loss, unusable resume state)."""


@dataclass(frozen=True)
class Phase:
    """One stage of a staged run (the paper: general 4K, then reasoning and annealing at 32K): its
    own steps, sequence length, batch size, learning-rate range and data mixture (domain weights;
    None = in proportion to the domains' tokens). Its warmup and cosine decay span the phase."""

    name: str
    steps: int
    seq_len: int
    batch_size: int
    lr: float
    min_lr: float
    warmup: int
    weights: dict[str, float] | None
    start: int  # the run's step at which the phase begins

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass
class TrainConfig:
    """Every knob of a run."""

    model: str = "moge-tiny"
    data: str = "data/corpus"
    out: str = "runs/moge-tiny"
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_alpha: float = 0.01
    aux_scope: str = "micro"
    z_loss: float = 1e-3
    bias_update_rate: float = 0.0
    eval_every: int = 200
    eval_windows: int = 16
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    init_std: float = 0.02
    # multi-token prediction (DeepSeek-V3): 1 adds an MTP module to the model (0 = as its config says);
    # a weight > 0 adds weight * CE of the MTP module's prediction of token t+2 to the loss
    mtp_modules: int = 0
    mtp_loss_weight: float = 0.0
    # under torchrun: ranks that share one copy of the routed experts (1 = plain data parallel);
    # every rank is a data-parallel rank and takes batch_size / world sequences of each micro-batch
    expert_parallel: int = 1
    dist_timeout: float = 300.0
    # start from this checkpoint's weights (released layout) with a fresh optimizer ("" = from scratch)
    init: str = ""
    # the data mixture of a run without phases: domain -> weight ({} = in proportion to the tokens)
    domain_weights: dict[str, float] = field(default_factory=dict)
    # a staged run: a list of {name, steps, seq_len, batch_size, lr, min_lr, warmup, weights}; keys a
    # phase leaves out take the run's values. `steps` is then the phases' total.
    phases: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.phases:
            self.steps = sum(p.steps for p in self.phase_list())
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows", "save_every",
                     "keep_checkpoints", "expert_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad_value(name, v, "must be a positive integer")
        if not self.dist_timeout > 0:
            raise bad_value("dist_timeout", self.dist_timeout, "must be > 0 seconds")
        for name in ("warmup", "threads"):
            if getattr(self, name) < 0:
                raise bad_value(name, getattr(self, name), "must be >= 0")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"lr={self.lr}, min_lr={self.min_lr} are invalid: need lr > 0 and 0 <= min_lr <= lr")
        if self.aux_scope not in AUX_SCOPES:
            raise bad_value("aux_scope", self.aux_scope, f"choose one of {AUX_SCOPES}")
        if self.mtp_modules not in (0, 1):
            raise bad_value("mtp_modules", self.mtp_modules, "0 (as the model config says) or 1")
        if self.mtp_loss_weight > 0 and self.seq_len < 2:
            raise ConfigError(f"mtp_loss_weight={self.mtp_loss_weight} needs seq_len >= 2 (MTP predicts token t+2)")
        for name in ("aux_alpha", "z_loss", "weight_decay", "grad_clip", "bias_update_rate", "mtp_loss_weight"):
            if getattr(self, name) < 0:
                raise bad_value(name, getattr(self, name), "must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2} are invalid: must be in [0, 1)")

        _check_weights("domain_weights", self.domain_weights)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def phase_list(self) -> list[Phase]:
        """The run's phases, with the run's values for what a phase leaves out; a run without phases
        is one phase."""
        if not self.phases:
            return [Phase("main", self.steps, self.seq_len, self.batch_size, self.lr, self.min_lr, self.warmup,
                          dict(self.domain_weights) or None, 0)]
        if not isinstance(self.phases, list):
            raise bad_value("phases", self.phases, "must be a list of {name, steps, seq_len, ...} objects")
        out, start = [], 0
        for i, raw in enumerate(self.phases):
            if not isinstance(raw, dict):
                raise bad_value(f"phases[{i}]", raw, f"must be an object with keys among {PHASE_KEYS}")
            unknown = sorted(set(raw) - set(PHASE_KEYS))
            if unknown:
                raise ConfigError(f"phases[{i}] has unknown keys {unknown}: valid keys are {', '.join(PHASE_KEYS)}")
            if "steps" not in raw:
                raise ConfigError(f"phases[{i}] has no 'steps': every phase says how many steps it takes")
            get = {k: raw.get(k, getattr(self, k, None)) for k in PHASE_KEYS}
            for name in ("steps", "seq_len", "batch_size"):
                v = get[name]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise bad_value(f"phases[{i}].{name}", v, "must be a positive integer")
            if isinstance(get["warmup"], bool) or not isinstance(get["warmup"], int) or get["warmup"] < 0:
                raise bad_value(f"phases[{i}].warmup", get["warmup"], "must be an integer >= 0")
            lr, min_lr = get["lr"], get["min_lr"]
            if not isinstance(lr, (int, float)) or not isinstance(min_lr, (int, float)) or not lr > 0 \
                    or not 0 <= min_lr <= lr:
                raise ConfigError(f"phases[{i}]: lr={lr}, min_lr={min_lr} are invalid: need lr > 0 and "
                                  f"0 <= min_lr <= lr")
            weights = raw.get("weights", dict(self.domain_weights) or None)
            if weights is not None:
                _check_weights(f"phases[{i}].weights", weights)
            name = str(raw.get("name", f"phase{i}"))
            out.append(Phase(name, get["steps"], get["seq_len"], get["batch_size"], float(lr), float(min_lr),
                             get["warmup"], dict(weights) if weights is not None else None, start))
            start += get["steps"]
        return out

    def check_domains(self, domains: list[str]) -> None:
        """Every domain a mixture names exists in the corpus (checked before training starts, not
        when a later phase begins)."""
        for i, p in enumerate(self.phase_list()):
            unknown = sorted(set(p.weights or {}) - set(domains))
            if unknown:
                where = f"phases[{i}].weights" if self.phases else "domain_weights"
                raise ConfigError(f"{where} names {unknown}, not in the corpus: its domains are {', '.join(domains)}")

    def phase_at(self, step: int) -> Phase:
        """The phase that optimizer step `step` (0-based) belongs to (the last one past the end)."""
        phases = self.phase_list()
        for p in phases:
            if step < p.end:
                return p
        return phases[-1]


def _check_weights(name: str, weights: Any) -> None:
    if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
        raise bad_value(name, weights, "must be an object mapping domain names to weights")
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise bad_value(f"{name}[{k!r}]", w, "must be a finite number >= 0")
    if weights and sum(weights.values()) <= 0:
        raise ConfigError(f"{name}={weights} are all zero: at least one domain needs a positive weight")
