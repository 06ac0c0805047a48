"""Training loop for MoGE, top-K MoE and dense language models, with exact resume.

One step = `grad_accum` micro-batches of `batch_size` windows of `seq_len` tokens, then AdamW
(beta1 0.9, beta2 0.95) with linear warmup and cosine decay, gradient clipping, the paper's
auxiliary balance loss (micro-batch, global-batch or per-group scope) and router z-loss.

Everything a resumed run needs is in a checkpoint directory: the model in the released
safetensors layout, and `trainer.pt` (optimizer, step, RNG state; loaded with weights_only). The
data sampler is a pure function of (seed, step), so a run interrupted and resumed produces the
same losses as one that never stopped (fp32 on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moge.balance import (GlobalBatchAuxLoss, aux_loss, device_loads, local_group_aux_loss, max_over_mean,
                          z_loss)
from moge.config import ModelConfig, load_model_config
from moge.io import atomic_write_text
from moge.model import PanguProMoEForCausalLM
from moge.routing import Router

AUX_SCOPES = ("micro", "global", "local")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, unusable resume state)."""


@dataclass
class TrainConfig:
    """Every knob of a run; saved next to the checkpoints so `--resume` continues the same run."""

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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows", "save_every",
                     "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid: must be a positive integer")
        for name in ("warmup", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 0")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr={self.lr}, min_lr={self.min_lr} are invalid: need lr > 0 and 0 <= min_lr <= lr")
        if self.aux_scope not in AUX_SCOPES:
            raise ValueError(f"aux_scope={self.aux_scope!r} is invalid: choose one of {AUX_SCOPES}")
        for name in ("aux_alpha", "z_loss", "weight_decay", "grad_clip", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1={self.beta1}, beta2={self.beta2} are invalid: must be in [0, 1)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


class TrainData:
    """The prepared corpus as the trainer sees it: torch batches addressed by (step, micro-batch) and
    fixed validation windows per domain. Batches are a pure function of (seed, step, micro)."""

    def __init__(self, root: str | Path, *, seq_len: int, seed: int = 0):
        from moge.data.shards import TokenShards

        self.shards = TokenShards(root)
        self.seq_len, self.seed = seq_len, seed
        self.vocab_size, self.eos_id, self.pad_id = self.shards.vocab_size, self.shards.eos_id, self.shards.pad_id
        self.domains = self.shards.domains
        self.tokenizer_path = self.shards.tokenizer_path
        self._samplers: dict[int, Any] = {}

    def train_batch(self, step: int, micro: int, batch_size: int) -> torch.Tensor:
        """[batch_size, seq_len + 1] token ids: inputs [:, :-1], targets [:, 1:]."""
        from moge.data.shards import TrainSampler

        if batch_size not in self._samplers:
            self._samplers[batch_size] = TrainSampler(self.shards, batch_size=batch_size, seq_len=self.seq_len,
                                                      seed=self.seed)
        return torch.from_numpy(self._samplers[batch_size].batch(step, micro).tokens)

    def val_batches(self, domain: str, windows: int, batch_size: int):
        for arr in self.shards.val_batches(domain, seq_len=self.seq_len, batch_size=batch_size, max_windows=windows):
            yield torch.from_numpy(arr)


def load_data(cfg: TrainConfig) -> TrainData:
    """The corpus at cfg.data; a clear error when it has not been prepared yet."""
    try:
        return TrainData(cfg.data, seq_len=cfg.seq_len, seed=cfg.seed)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. Prepare it first: moge data prepare --out {cfg.data}") from None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(model_cfg: ModelConfig, cfg: TrainConfig) -> PanguProMoEForCausalLM:
    model = PanguProMoEForCausalLM(model_cfg)
    if cfg.bias_update_rate > 0 and model_cfg.is_moe:
        # aux-loss-free balancing needs routers with the selection-bias buffers
        for layer in model.model.layers:
            layer.mlp.router = Router(dataclasses.replace(layer.mlp.cfg, aux_free_bias=True))
    return model.init_weights(cfg.init_std, seed=cfg.seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, router_scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


class Trainer:
    """Owns the model, optimizer, data and checkpoints of one run directory."""

    def __init__(self, cfg: TrainConfig, data: Any, *, log=print):
        self.cfg = cfg
        self.data = data
        self.log = log
        self.out = Path(cfg.out)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if cfg.device == "auto" else cfg.device))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model_cfg = load_model_config(cfg.model)
        if self.model_cfg.vocab_size < data.vocab_size:
            self.model_cfg = self.model_cfg.replace(vocab_size=data.vocab_size)
        self.model_cfg = self.model_cfg.replace(eos_token_id=data.eos_id, pad_token_id=data.pad_id,
                                                bos_token_id=data.eos_id)
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.model_cfg, cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.step = 0
        self.global_aux = GlobalBatchAuxLoss(self.model_cfg.top_k, cfg.aux_alpha) \
            if cfg.aux_scope == "global" else None
        self._stop_signal: int | None = None

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save(self) -> Path:
        """Atomically write checkpoints/step-NNNNNN (model + trainer state), then point `latest` at it."""
        from moge.checkpoint import save_pretrained

        final = self.ckpt_root / f"step-{self.step:06d}"
        tmp = self.ckpt_root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model, tmp)
        tokenizer = getattr(self.data, "tokenizer_path", None)
        if tokenizer is not None and Path(tokenizer).exists():  # so `moge generate --model CKPT` has it
            shutil.copy2(tokenizer, tmp / Path(tokenizer).name)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "train_config": json.dumps(dataclasses.asdict(self.cfg)),
                 "routers": self._router_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.ckpt_root / "latest", final.name + "\n")
        old = sorted(p for p in self.ckpt_root.glob("step-*") if p.is_dir() and p != final)
        for p in old[:max(0, len(old) - (self.cfg.keep_checkpoints - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def _router_state(self) -> dict:
        return {name: buf.clone() for name, buf in self.model.named_buffers() if name.endswith("tokens_per_expert")}

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_root / "latest"
        if not pointer.exists():
            return None
        path = self.ckpt_root / pointer.read_text().strip()
        if not (path / "trainer.pt").exists():
            raise TrainingError(f"{pointer} points to {path}, which is missing or incomplete")
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of this run directory; False if there is none."""
        from moge.checkpoint import load_state_dict_into

        path = self.latest_checkpoint()
        if path is None:
            return False
        state = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
        saved = json.loads(state["train_config"])
        for key in ("model", "batch_size", "seq_len", "grad_accum", "seed", "aux_scope"):
            if saved[key] != getattr(self.cfg, key):
                raise TrainingError(f"cannot resume {path}: {key}={getattr(self.cfg, key)!r} differs from the "
                                    f"checkpoint's {saved[key]!r}; use the same value or a new --out")
        load_state_dict_into(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        buffers = dict(self.model.named_buffers())
        for name, value in state.get("routers", {}).items():
            buffers[name].copy_(value)
        self.step = int(state["step"])
        self._truncate_metrics(self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from, so the log reads as one run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # ---- one step ------------------------------------------------------------------------------
    def _micro_loss(self, x_BS: torch.Tensor, y_BS: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg, mc = self.cfg, self.model_cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x_BS, return_routing=mc.is_moe)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y_BS.reshape(-1))
        stats = {"ce": ce.item()}
        loss = ce
        if mc.is_moe:
            aux_terms, z_terms, scores, mom = [], [], [], []
            dev_map = torch.arange(mc.num_experts, device=x_BS.device) // (mc.num_experts // mc.num_groups)
            for layer, r in enumerate(out.routing):
                if cfg.aux_alpha:
                    if cfg.aux_scope == "micro":
                        aux_terms.append(aux_loss(r.probs_TN, r.experts_TK, cfg.aux_alpha))
                    elif cfg.aux_scope == "global":
                        aux_terms.append(self.global_aux(r.probs_TN, r.experts_TK, layer=layer))
                    else:
                        aux_terms.append(local_group_aux_loss(r.logits_TN, r.experts_TK, r.group_of_expert_N,
                                                              cfg.aux_alpha))
                if cfg.z_loss:
                    z_terms.append(z_loss(r.logits_TN, cfg.z_loss))
                with torch.no_grad():
                    loads = device_loads(r.experts_TK, dev_map, mc.num_groups).float()
                    scores.append(float((loads.max() - loads.min()) / r.experts_TK.shape[0]))
                    mom.append(float(max_over_mean(loads)))
            if aux_terms:
                aux = torch.stack(aux_terms).mean()
                loss = loss + aux
                stats["aux"] = aux.item()
            if z_terms:
                zl = torch.stack(z_terms).mean()
                loss = loss + zl
                stats["z"] = zl.item()
            stats["imbalance"] = sum(scores) / len(scores)
            stats["device_max_over_mean"] = sum(mom) / len(mom)
        return loss, stats

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = self.data.train_batch(self.step, micro, cfg.batch_size).to(self.device)
            loss, stats = self._micro_loss(batch[:, :-1], batch[:, 1:])
            if not torch.isfinite(loss):
                last = self.latest_checkpoint()
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.step}, micro-batch {micro}; "
                                    f"stopping without saving. Last good checkpoint: "
                                    f"{last if last is not None else 'none'}. Try a lower --lr or --grad-clip.")
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip else 1e30)
        if not torch.isfinite(norm):
            raise TrainingError(f"non-finite gradient norm at step {self.step}; stopping without saving")
        self.optimizer.step()
        if self.global_aux is not None:
            self.global_aux.reset()
        if cfg.bias_update_rate > 0 and self.model_cfg.is_moe:
            for layer in self.model.model.layers:
                layer.mlp.router.update_bias(cfg.bias_update_rate)
        self.step += 1
        return {"step": self.step, "lr": lr, "grad_norm": float(norm), **totals}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation cross-entropy per token, per domain, over fixed windows."""
        self.model.eval()
        result = {}
        for domain in self.data.domains:
            total, tokens = 0.0, 0
            for batch in self.data.val_batches(domain, self.cfg.eval_windows, self.cfg.batch_size):
                batch = batch.to(self.device)
                logits = self.model(batch[:, :-1]).logits
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum").item()
                tokens += batch[:, 1:].numel()
            result[domain] = total / max(1, tokens)
        self.model.train()
        return result

    # ---- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def fit(self, progress: bool = True) -> dict:
        """Train until `steps`; returns a summary. SIGINT/SIGTERM save a checkpoint and return."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        metrics_path = self.out / "metrics.jsonl"
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        interrupted = False
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                row = self.train_step()
                dt = time.perf_counter() - t0
                row["tokens_per_s"] = cfg.tokens_per_step / dt
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.evaluate()
                    row["val"] = last_eval
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                bar.update(1)
                post = {"loss": f"{row['ce']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "imbalance" in row:
                    post["IS"] = f"{row['imbalance']:.3f}"
                bar.set_postfix(post)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if self._stop_signal is not None:
                    self.save()
                    interrupted = True
                    self.log(f"\nstopped by signal {self._stop_signal} at step {self.step}; checkpoint saved to "
                             f"{self.latest_checkpoint()}; continue with --resume")
                    break
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        return {"step": self.step, "interrupted": interrupted, "val": last_eval,
                "checkpoint": str(self.latest_checkpoint())}
