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

from moge.metrics import device_loads, max_over_mean
from moge.nn.losses import GlobalBatchAuxLoss, aux_loss, local_group_aux_loss, z_loss
from moge.config import ModelConfig, load_model_config
from moge.io import atomic_write_text
from moge.nn.moe import MoGEBlock
from moge.nn.model import PanguProMoEForCausalLM
from moge.parallel.expert import full_state_dict, shard_model, shard_state_dict
from moge.parallel.launch import comm_device
from moge.parallel.mesh import ExpertParallelMesh, check_expert_parallel
from moge.parallel.training import (clip_grad_norm, load_optimizer_state_by_name, optimizer_state_by_name,
                                    reduce_gradients)
from moge.nn.routing import Router

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
                     "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid: must be a positive integer")
        if not isinstance(self.expert_parallel, int) or self.expert_parallel < 1:
            raise ValueError(f"expert_parallel={self.expert_parallel!r} is invalid: must be a positive integer")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout!r} is invalid: must be > 0 seconds")
        for name in ("warmup", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 0")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr={self.lr}, min_lr={self.min_lr} are invalid: need lr > 0 and 0 <= min_lr <= lr")
        if self.aux_scope not in AUX_SCOPES:
            raise ValueError(f"aux_scope={self.aux_scope!r} is invalid: choose one of {AUX_SCOPES}")
        if self.mtp_modules not in (0, 1):
            raise ValueError(f"mtp_modules={self.mtp_modules!r} is invalid: 0 (as the model config says) or 1")
        if self.mtp_loss_weight > 0 and self.seq_len < 2:
            raise ValueError(f"mtp_loss_weight={self.mtp_loss_weight} needs seq_len >= 2 (MTP predicts token t+2)")
        for name in ("aux_alpha", "z_loss", "weight_decay", "grad_clip", "bias_update_rate", "mtp_loss_weight"):
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
    if cfg.mtp_modules and model_cfg.num_mtp_modules != cfg.mtp_modules:
        model_cfg = model_cfg.replace(num_mtp_modules=cfg.mtp_modules)
    if cfg.mtp_loss_weight > 0 and not model_cfg.num_mtp_modules:
        raise ValueError(f"mtp_loss_weight={cfg.mtp_loss_weight} needs a model with an MTP module: pass --mtp "
                         f"(mtp_modules=1) or use a model config with num_nextn_predict_layers=1")
    model = PanguProMoEForCausalLM(model_cfg)
    if cfg.bias_update_rate > 0 and model_cfg.is_moe:
        # aux-loss-free balancing needs routers with the selection-bias buffers
        for block in model.modules():  # the trunk's layers and the MTP module's
            if isinstance(block, MoGEBlock):
                block.router = Router(dataclasses.replace(block.cfg, aux_free_bias=True))
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
        # Under torchrun every rank builds the same whole model (same seed), then keeps its expert shard.
        self.mesh = None
        self._comm_device = torch.device("cpu")
        self.rank, self.world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {self.world} data-parallel ranks")
        if cfg.expert_parallel > 1 and self.world == 1:
            raise ValueError(f"expert_parallel={cfg.expert_parallel} needs that many processes: launch with "
                             f"torchrun --nproc-per-node {cfg.expert_parallel} -m moge train ...")
        model = build_model(self.model_cfg, cfg)
        if self.world > 1:
            if self.model_cfg.is_moe:
                check_expert_parallel(self.model_cfg.moe(), cfg.expert_parallel)
            elif cfg.expert_parallel > 1:
                raise ValueError(f"expert_parallel={cfg.expert_parallel} needs a model with experts "
                                 f"({cfg.model} is dense)")
            self.mesh = ExpertParallelMesh.build(cfg.expert_parallel)
            self._comm_device = comm_device()
            shard_model(model, self.mesh, same_tokens_per_rank=True)  # every micro-batch has one shape
        self.model = model.to(self.device)
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

        # collective under torchrun: the expert shards and their optimizer state are gathered, rank 0 writes
        weights = full_state_dict(self.model, self.mesh)
        optimizer_state = optimizer_state_by_name(self.optimizer, self.model, self.mesh)
        final = self.ckpt_root / f"step-{self.step:06d}"
        if self.rank != 0:
            self._barrier()
            return final
        tmp = self.ckpt_root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model, tmp, state_dict=weights)
        tokenizer = getattr(self.data, "tokenizer_path", None)
        if tokenizer is not None and Path(tokenizer).exists():  # so `moge generate --model CKPT` has it
            shutil.copy2(tokenizer, tmp / Path(tokenizer).name)
        state = {"step": self.step, "optimizer_by_name": optimizer_state,
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
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

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
        if self.mesh is None:
            load_state_dict_into(self.model, path)
        else:  # any expert-parallel size: read the whole model, keep this rank's expert shard
            from moge.checkpoint import load_pretrained

            whole = load_pretrained(path).state_dict()
            self.model.load_state_dict(shard_state_dict(whole, self.mesh))
            del whole
        if "optimizer_by_name" in state:
            load_optimizer_state_by_name(self.optimizer, self.model, state["optimizer_by_name"], self.mesh)
        elif self.mesh is None:  # checkpoints written before optimizer state was keyed by name
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            raise TrainingError(f"{path}/trainer.pt predates expert-parallel checkpoints; resume it with a "
                                f"single process first")
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        buffers = dict(self.model.named_buffers())
        for name, value in state.get("routers", {}).items():
            buffers[name].copy_(value)
        self.step = int(state["step"])
        if self.rank == 0:
            self._truncate_metrics(self.step)
        self._barrier()
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
        mtp = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x_BS, return_routing=mc.is_moe)
            if cfg.mtp_loss_weight > 0:
                # MTP at position t sees h_t and x_{t+1} = y_t and predicts y_{t+1}; the last position has no target
                mtp = self.model.mtp_forward(out.pre_norm_hidden[:, :-1], y_BS[:, :-1], return_routing=mc.is_moe)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y_BS.reshape(-1))
        stats = {"ce": ce.item()}
        loss = ce
        if mtp is not None:
            mtp_ce = F.cross_entropy(mtp.logits.reshape(-1, mtp.logits.shape[-1]), y_BS[:, 1:].reshape(-1))
            loss = loss + cfg.mtp_loss_weight * mtp_ce
            stats["mtp"] = mtp_ce.item()
        if mc.is_moe:
            aux_terms, z_terms, scores, mom = [], [], [], []
            dev_map = torch.arange(mc.num_experts, device=x_BS.device) // (mc.num_experts // mc.num_groups)
            # the MTP module's MoE layer is balanced like the trunk's layers
            routings = out.routing + (mtp.routing if mtp is not None else [])
            for layer, r in enumerate(routings):
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
            batch = self.data.train_batch(self.step, micro, cfg.batch_size)
            if self.world > 1:  # this rank's rows of the micro-batch
                rows = cfg.batch_size // self.world
                batch = batch[self.rank * rows:(self.rank + 1) * rows]
            batch = batch.to(self.device)
            loss, stats = self._micro_loss(batch[:, :-1], batch[:, 1:])
            if not self._all_finite(loss):
                last = self.latest_checkpoint()
                where = f" (loss here {loss.item()}; some rank's is not finite)" if self.world > 1 else \
                    f" ({loss.item()})"
                raise TrainingError(f"non-finite loss{where} at step {self.step}, micro-batch {micro}; "
                                    f"stopping without saving. Last good checkpoint: "
                                    f"{last if last is not None else 'none'}. Try a lower --lr or --grad-clip.")
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        if self.mesh is not None:
            reduce_gradients(self.model, self.mesh)
            totals = self._mean_over_ranks(totals)
        norm = clip_grad_norm(self.model.named_parameters(), cfg.grad_clip if cfg.grad_clip else 1e30, self.mesh)
        if not torch.isfinite(norm):
            raise TrainingError(f"non-finite gradient norm at step {self.step}; stopping without saving")
        self.optimizer.step()
        if self.global_aux is not None:
            self.global_aux.reset()
        if cfg.bias_update_rate > 0 and self.model_cfg.is_moe:
            for router in self.model.modules():
                if isinstance(router, Router):
                    router.update_bias(cfg.bias_update_rate)
        self.step += 1
        return {"step": self.step, "lr": lr, "grad_norm": float(norm), **totals}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank agrees, so they all stop together instead of leaving the others waiting."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self._comm_device)
        if self.world > 1:
            torch.distributed.all_reduce(bad)
        return not bool(bad)

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(keys, values, strict=True)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation cross-entropy per token, per domain, over fixed windows; with an MTP
        module also its cross-entropy on token t+2 as `mtp/<domain>`."""
        self.model.eval()
        result, mtp_result = {}, {}
        has_mtp = bool(getattr(self.model, "config", self.model_cfg).num_mtp_modules)
        for domain in self.data.domains:
            total, tokens, mtp_total, mtp_tokens = 0.0, 0, 0.0, 0
            for batch in self.data.val_batches(domain, self.cfg.eval_windows, self.cfg.batch_size):
                batch = batch.to(self.device)
                out = self.model(batch[:, :-1])
                logits = out.logits
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum").item()
                tokens += batch[:, 1:].numel()
                if has_mtp and batch.shape[1] > 2:  # the MTP module's CE on token t+2
                    m = self.model.mtp_forward(out.pre_norm_hidden[:, :-1], batch[:, 1:-1]).logits
                    mtp_total += F.cross_entropy(m.reshape(-1, m.shape[-1]), batch[:, 2:].reshape(-1),
                                                 reduction="sum").item()
                    mtp_tokens += batch[:, 2:].numel()
            result[domain] = total / max(1, tokens)
            if has_mtp:
                mtp_result[f"mtp/{domain}"] = mtp_total / max(1, mtp_tokens)
        self.model.train()
        return result | mtp_result

    # ---- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """A signal on any rank stops every rank after the same step."""
        if self.world == 1:
            return self._stop_signal is not None
        flag = torch.tensor([float(self._stop_signal or 0)], device=self._comm_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return bool(flag.item())

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
                dt = time.perf_counter() - t0
                row["tokens_per_s"] = cfg.tokens_per_step / dt
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.evaluate()
                    row["val"] = last_eval
                if lead:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                bar.update(1)
                post = {"loss": f"{row['ce']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "imbalance" in row:
                    post["IS"] = f"{row['imbalance']:.3f}"
                bar.set_postfix(post)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if self._stop_requested():
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
