"""The training loop for MoGE, top-K MoE and dense language models, with exact resume.

One step = `grad_accum` micro-batches of `batch_size` windows of `seq_len` tokens, then AdamW
(beta1 0.9, beta2 0.95) with linear warmup and cosine decay, gradient clipping, the paper's
auxiliary balance loss (micro-batch, global-batch or per-group scope) and router z-loss. The parts
live next door: config, data, model, optim, step (the loss and evaluation), checkpointing, and
processes / distributed (what changes under torchrun).

The data sampler is a pure function of (seed, step) and a checkpoint holds the optimizer and RNG
state, so a run interrupted and resumed produces the same losses as one that never stopped (fp32
on CPU). A staged run (`TrainConfig.phases`) changes sequence length, batch size, learning-rate
range and data mixture at phase boundaries; since all of them follow from the step, resuming across
a boundary is exact too. `init` starts from a checkpoint's weights with a fresh optimizer.

Post-training reuses the loop: `moge.train.sft` and `moge.train.rl` subclass `Trainer` and replace
`micro_batch` (SFT) or `train_step` (GRPO).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any

import torch

from moge.errors import ConfigError
from moge.io import atomic_write_text
from moge.nn.losses import GlobalBatchAuxLoss
from moge.nn.routing import Router
from moge.train import checkpointing
from moge.train.config import AUX_SCOPES, TrainConfig, TrainingError
from moge.train.data import TrainData, load_data
from moge.train.model import build_model, model_config_for
from moge.train.optim import lr_at, make_optimizer, phase_lr
from moge.train.processes import join_run
from moge.train.step import evaluate, micro_batch_loss

# the names callers import from here (the parts live in the modules above)
__all__ = ["AUX_SCOPES", "TrainConfig", "TrainData", "Trainer", "TrainingError", "build_model", "load_data", "lr_at"]


class Trainer:
    """Owns the model, optimizer, data and checkpoints of one run directory."""

    def __init__(self, cfg: TrainConfig, data: Any, *, log=print):
        self.cfg, self.data, self.log = cfg, data, log
        self.out = Path(cfg.out)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if cfg.device == "auto" else cfg.device))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if getattr(data, "domains", None):
            cfg.check_domains(list(data.domains))
        self.model_cfg = init_model_config(cfg.init, data.vocab_size) if cfg.init else \
            model_config_for(cfg, data.vocab_size, data.eos_id, data.pad_id)
        torch.manual_seed(cfg.seed)
        self.procs = join_run(cfg, self.model_cfg)
        self.rank = self.procs.rank
        self.model = build_model(self.model_cfg, cfg, self.procs.shard).to(self.device)  # only this rank's part
        if cfg.init:
            load_init_weights(self.model, cfg.init, self.procs.world)
        self.optimizer = make_optimizer(self.model, cfg)
        self.step = 0
        self.global_aux = GlobalBatchAuxLoss(self.model_cfg.top_k, cfg.aux_alpha) \
            if cfg.aux_scope == "global" else None
        self._stop_signal: int | None = None
        self._saved_step: int | None = None  # the step the newest checkpoint holds

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return checkpointing.latest_checkpoint(self.ckpt_root)

    def save(self) -> Path:
        """Save this step (once: a step already saved is not written again) and point `latest` at
        it. Collective under torchrun: every rank writes its own part, nothing is gathered."""
        if self._saved_step == self.step:
            return checkpointing.step_dir(self.ckpt_root, self.step)
        checkpointing.check_unsaved(self.ckpt_root, self.step)  # on every rank, before any collective
        path = self.procs.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer,
                                          checkpointing.trainer_state(self.step, self.cfg, self.model)
                                          | {"extra": self.extra_state()},
                                          tokenizer=getattr(self.data, "tokenizer_path", None),
                                          keep=self.cfg.keep_checkpoints)
        self._saved_step = self.step
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of this run directory; False if there is none."""
        path = self.latest_checkpoint()
        if path is None:
            return False
        state = checkpointing.read_trainer_state(path, self.cfg)
        self.procs.load(self.model, self.optimizer, path, state)
        checkpointing.restore_rng_and_routers(state, self.model)
        self.load_extra_state(state.get("extra", {}))
        self.step = self._saved_step = int(state["step"])
        if self.rank == 0:
            checkpointing.truncate_metrics(self.out / "metrics.jsonl", self.step)
        self.procs.barrier()
        return True

    def extra_state(self) -> dict:
        """What a subclass needs in the checkpoint beyond weights, optimizer and RNG (weights_only-safe)."""
        return {}

    def load_extra_state(self, state: dict) -> None:  # noqa: B027 - a hook: nothing to restore by default
        """Restore `extra_state` on resume."""

    # ---- one step ------------------------------------------------------------------------------
    def micro_batch(self, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of micro-batch `micro` of this step (pretraining: windows of the phase's corpus mixture)."""
        cfg = self.cfg
        phase = cfg.phase_at(self.step)
        extra = {}
        if phase.seq_len != cfg.seq_len or phase.weights:
            extra = {"seq_len": phase.seq_len, "weights": phase.weights}
        batch = self.procs.local_rows(self.data.train_batch(self.step, micro, phase.batch_size, **extra))
        batch = batch.to(self.device)
        return micro_batch_loss(self.model, self.model_cfg, cfg, batch[:, :-1], batch[:, 1:], self.global_aux)

    def tokens_per_step(self) -> int:
        phase = self.cfg.phase_at(max(0, self.step - 1))
        return phase.batch_size * phase.seq_len * self.cfg.grad_accum

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        lr = phase_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            loss, stats = self.micro_batch(micro)
            if not self.procs.all_finite(loss):
                last = self.latest_checkpoint()
                where = f" (loss here {loss.item()}; some rank's is not finite)" if self.procs.world > 1 else \
                    f" ({loss.item()})"
                raise TrainingError(f"non-finite loss{where} at step {self.step}, micro-batch {micro}; "
                                    f"stopping without saving. Last good checkpoint: "
                                    f"{last if last is not None else 'none'}. Try a lower --lr or --grad-clip.")
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        norm, totals = self.procs.finish_gradients(self.model, totals, cfg.grad_clip if cfg.grad_clip else 1e30)
        if not torch.isfinite(norm):
            raise TrainingError(f"non-finite gradient norm at step {self.step}; stopping without saving")
        self.optimizer.step()
        if self.global_aux is not None:
            self.global_aux.reset()
        if cfg.bias_update_rate > 0 and self.model_cfg.is_moe:
            for router in self.model.modules():  # the MTP module's router too
                if isinstance(router, Router):
                    router.update_bias(cfg.bias_update_rate)
        row = {"step": self.step + 1, "lr": lr, "grad_norm": float(norm), **totals}
        if cfg.phases:
            row["phase"] = cfg.phase_at(self.step).name
        self.step += 1
        return row

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data, self.cfg, self.device)

    # ---- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """A signal on any rank stops every rank after the same step."""
        agreed = self.procs.stop_signal(self._stop_signal)
        if agreed and self._stop_signal is None:
            self._stop_signal = agreed
        return agreed is not None

    def fit(self, progress: bool = True) -> dict:
        """Train until `steps`; returns a summary. SIGINT/SIGTERM save a checkpoint and return."""
        from tqdm import tqdm

        cfg = self.cfg
        lead = self.rank == 0  # under torchrun only rank 0 writes logs and shows progress
        self.out.mkdir(parents=True, exist_ok=True)
        if lead:
            atomic_write_text(self.out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        metrics_path = self.out / "metrics.jsonl"
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or not lead, unit="step",
                   dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        interrupted = False
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                row = self.train_step()
                row["tokens_per_s"] = row.pop("tokens", self.tokens_per_step()) / (time.perf_counter() - t0)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.evaluate()
                    row["val"] = last_eval
                if lead:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                bar.update(1)
                post = {"loss": f"{row.get('ce', row.get('loss', float('nan'))):.3f}",
                        "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "imbalance" in row:
                    post["IS"] = f"{row['imbalance']:.3f}"
                bar.set_postfix(post)
                interrupted = self._stop_requested()
                boundary = bool(cfg.phases) and self.step == cfg.phase_at(self.step - 1).end
                if interrupted or self.step % cfg.save_every == 0 or self.step == cfg.steps or boundary:
                    self.save()  # once, also when a stop arrives on a save step
                if interrupted:
                    self.log(f"\nstopped by signal {self._stop_signal} at step {self.step}; checkpoint saved to "
                             f"{self.latest_checkpoint()}; continue with --resume")
                    break
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        return {"step": self.step, "interrupted": interrupted, "val": last_eval,
                "checkpoint": str(self.latest_checkpoint())}


def init_model_config(path: str, vocab_size: int):
    """The model config of checkpoint `path` (`--init`), checked against the data's vocabulary."""
    from moge.checkpoint.files import read_config

    model_cfg = read_config(path)
    if model_cfg.vocab_size < vocab_size:
        raise ConfigError(f"init={path}: the checkpoint's vocab_size={model_cfg.vocab_size} is smaller than the "
                          f"data's {vocab_size}; use a checkpoint trained on this tokenizer")
    return model_cfg


def load_init_weights(model: torch.nn.Module, path: str, world: int) -> None:
    """Copy the weights of checkpoint `path` into the freshly built model (single process)."""
    from moge.checkpoint.load import load_state_dict_into

    if world > 1:
        raise ConfigError(f"init={path} is supported in one process only (this run has {world}); start "
                          f"from the checkpoint in one process, or resume a run instead")
    with torch.no_grad():
        load_state_dict_into(model, path)
