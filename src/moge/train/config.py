"""What a training run is: every knob in one dataclass, validated once and saved next to the
checkpoints so `--resume` continues the same run."""

from __future__ import annotations

from dataclasses import dataclass

from moge.errors import ConfigError, MogeError, bad_value

AUX_SCOPES = ("micro", "global", "local")


class TrainingError(MogeError, RuntimeError):
    """Training cannot continue (non-finite loss, unusable resume state)."""


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

    def __post_init__(self) -> None:
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

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum
