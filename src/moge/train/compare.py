"""`moge compare`: MoGE against top-K MoE, DeepSeek-style group-limited routing and a dense model,
at equal activated parameters and equal tokens, over several seeds.

Every (variant, seed) pair is one training run in `OUT/runs/<variant>/seed-<s>`. The seed sets both
the initialisation and the data order, and the data order depends on nothing else, so at one seed
every variant sees the same batches in the same order: differences between variants can be taken
per seed (paired), which removes most of what the seed does to both. A finished run leaves
`result.json` next to its checkpoints; a re-run with the same settings reuses it, and an
interrupted run resumes from its last checkpoint. The report (`moge.train.compare_report`) is
written from the results alone, so it can be regenerated at any time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from moge.errors import ConfigError
from moge.io import atomic_write_text
from moge.metrics import load_stats
from moge.train.analysis import collect_routing, imbalance_by_batch_size
from moge.train.config import TrainConfig
from moge.train.data import load_data
from moge.train.trainer import Trainer

BALANCE_SIZES = (16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class Variant:
    """One model and training recipe of the study. `settings` override the study's TrainConfig."""

    name: str
    model: str
    label: str
    settings: tuple[tuple[str, Any], ...] = ()

    def config(self, base: TrainConfig, seed: int, out: Path) -> TrainConfig:
        """This variant's run at `seed`: the study's settings, its own model and overrides."""
        return dataclasses.replace(base, model=self.model, seed=seed, out=str(run_dir(out, self.name, seed)),
                                   **dict(self.settings))


# Aux-loss-free runs update the selection bias by 1e-3 per step (DeepSeek-V3's gamma). The
# group-limited run keeps DeepSeek-V3's small complementary balance loss (alpha 1e-4; V3's is
# per sequence, ours per micro-batch).
VARIANTS = (
    Variant("moge", "moge-tiny", "MoGE: 16 experts in 4 groups, top-1 per group; global-softmax aux loss"),
    Variant("moge-local-aux", "moge-tiny", "MoGE with the per-group local aux loss (the paper's ablation)",
            (("aux_scope", "local"),)),
    Variant("topk", "topk-tiny", "top-K MoE: the same 16 experts, K=4 over all; the same aux loss"),
    Variant("topk-aux-free", "topk-tiny", "top-K MoE balanced by the aux-loss-free selection bias, no aux loss",
            (("aux_alpha", 0.0), ("bias_update_rate", 1e-3))),
    Variant("deepseek", "deepseek-tiny", "DeepSeek-V3 routing: sigmoid scores, top-2 of 4 groups, K=4; "
            "selection bias + aux 1e-4", (("aux_alpha", 1e-4), ("bias_update_rate", 1e-3))),
    Variant("dense", "dense-tiny", "dense: one SwiGLU as wide as the activated experts + shared expert"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


def select_variants(names: Sequence[str] | None) -> tuple[Variant, ...]:
    """The named variants in the study's order (all of them for None); a clear error for unknown names."""
    if not names:
        return VARIANTS
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise ConfigError(f"variants={unknown} are unknown: choose from {list(VARIANT_NAMES)}")
    return tuple(v for v in VARIANTS if v.name in names)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed-{seed}"


# settings that do not change what a run learns: a study re-run with other values reuses its results
_NOT_IN_KEY = ("out", "threads", "save_every", "keep_checkpoints", "dist_timeout")


def _config_key(cfg: TrainConfig) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    return json.dumps(settings, sort_keys=True, default=str)


def finished_result(cfg: TrainConfig) -> dict | None:
    """The stored result of a finished run with these settings, else None. A run directory that
    holds a run with other settings is refused rather than silently mixed into the study."""
    path = Path(cfg.out) / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged result is measured again from the run's last checkpoint
    if result.get("config_key") != _config_key(cfg):
        raise ConfigError(f"{cfg.out} holds a finished run with other settings than this study's "
                          f"(steps, lr, seq_len, ...): use another --out, or delete that run to train it again")
    return result


def run_pair(variant: Variant, cfg: TrainConfig, progress: bool = False,
             log: Callable[[str], None] = print) -> dict | None:
    """Train one (variant, seed) run to the end (resuming if it was interrupted), measure it and store
    `result.json`. Returns None when a signal stopped it (its checkpoint is saved)."""
    done = finished_result(cfg)
    if done is not None:
        return done
    data = load_data(cfg)
    trainer = Trainer(cfg, data, log=log)
    trainer.resume()
    if trainer.step < cfg.steps and trainer.fit(progress=progress)["interrupted"]:
        return None
    result = measure(trainer, variant, data)
    result["config_key"] = _config_key(cfg)
    atomic_write_text(Path(cfg.out) / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def _run_pair_in_worker(variant: Variant, cfg: TrainConfig) -> dict | None:
    return run_pair(variant, cfg, progress=False, log=lambda _m: None)


@torch.no_grad()
def measure(trainer: Trainer, v: Variant, data) -> dict:
    """Validation loss per domain, the training curve, routing balance on the validation windows."""
    rows = [json.loads(line) for line in (Path(trainer.cfg.out) / "metrics.jsonl").read_text().splitlines() if line]
    val = trainer.evaluate()
    res = {"variant": v.name, "seed": trainer.cfg.seed, "label": v.label, "model": v.model, "val": val,
           "val_mean": sum(val.values()) / len(val), "params": trainer.model.num_parameters(),
           "tokens_per_step": trainer.tokens_per_step(),
           # seconds spent in training steps (from the per-step log), whatever interrupted the run
           "train_seconds": sum(trainer.tokens_per_step() / r["tokens_per_s"] for r in rows),
           "curve": [{"step": r["step"], "ce": r["ce"], **({"val": r["val"]} if "val" in r else {})} for r in rows]}
    mc = trainer.model_cfg
    if mc.is_moe:
        batches = {d: [b[:, :-1] for b in data.val_batches(d, 64, 16)] for d in data.domains}
        trace = collect_routing(trainer.model, batches)
        layers = []
        for layer in range(trace.num_layers):
            ids = trace.layer(layer)
            counts = torch.bincount(ids.reshape(-1), minlength=mc.num_experts)
            layers.append({"layer": layer, "expert_share": (counts.double() / counts.sum()).tolist(),
                           "experts": load_stats(counts),
                           "imbalance": imbalance_by_batch_size(ids, mc.num_experts, mc.num_groups, BALANCE_SIZES)})
        res["routing"] = layers
    return res


def run_study(base: TrainConfig, out: Path, seeds: Sequence[int], variants: Sequence[Variant] = VARIANTS, *,
              jobs: int = 1, progress: bool = True, log: Callable[[str], None] = print) -> dict[tuple[str, int], dict]:
    """Every (variant, seed) result, training the missing ones (seed-major order, so that an
    interrupted study has whole seeds first). With jobs > 1 that many runs train at once in
    separate processes, each with `base.threads` threads (default: the cores split between them).
    Raises KeyboardInterrupt when a signal stopped a run; finished runs stay reusable."""
    if jobs < 1:
        raise ConfigError(f"jobs={jobs} is invalid: must be >= 1")
    pairs = [(v, v.config(base, s, out)) for s in seeds for v in variants]
    results: dict[tuple[str, int], dict] = {}
    todo = []
    for v, cfg in pairs:
        done = finished_result(cfg)
        if done is not None:
            results[(v.name, cfg.seed)] = done
        else:
            todo.append((v, cfg))
    if len(results):
        log(f"compare: {len(results)} finished runs reused, {len(todo)} to train")
    if jobs == 1:
        for v, cfg in todo:
            log(f"compare: {v.name} seed {cfg.seed}: training {cfg.steps} steps in {cfg.out}")
            result = run_pair(v, cfg, progress=progress, log=log)
            if result is None:
                raise KeyboardInterrupt
            results[(v.name, cfg.seed)] = result
        return results
    threads = base.threads or max(1, (os.cpu_count() or 1) // jobs)
    todo = [(v, dataclasses.replace(cfg, threads=threads)) for v, cfg in todo]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not progress, unit="run", dynamic_ncols=True)
    interrupted = False
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_pair_in_worker, v, cfg): (v, cfg) for v, cfg in todo}
        try:
            for fut in as_completed(futures):
                v, cfg = futures[fut]
                result = fut.result()
                if result is None:
                    interrupted = True
                    continue
                results[(v.name, cfg.seed)] = result
                bar.update(1)
                bar.set_postfix(last=f"{v.name}/seed-{cfg.seed}", val=f"{result['val_mean']:.3f}")
                log(f"compare: {v.name} seed {cfg.seed}: mean validation loss {result['val_mean']:.4f}")
        except KeyboardInterrupt:
            interrupted = True
            pool.shutdown(wait=True, cancel_futures=True)  # running children save their checkpoints
        finally:
            bar.close()
    if interrupted:
        raise KeyboardInterrupt
    return results


# ---------------------------------------------------------------------------------------------
# Throughput: a dedicated, interleaved benchmark (training logs of a shared machine cannot say it)
# ---------------------------------------------------------------------------------------------


def measure_throughput(base: TrainConfig, variants: Sequence[Variant] = VARIANTS, *, rounds: int = 5,
                       steps: int = 3, threads: int = 1, log: Callable[[str], None] = print) -> dict:
    """Training tokens/s of each variant's model at the study's batch shape, fresh initialisation.

    The variants take turns: each round times `steps` optimizer steps of every variant in turn, so
    a slow patch of a shared machine hits all of them alike; the result is the median over rounds.
    """
    torch.set_num_threads(threads)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            cfg = dataclasses.replace(v.config(base, 0, Path(tmp)), threads=threads)
            trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
            for _ in range(2):  # warm-up: allocator, first-call costs
                trainer.train_step()
            trainers[v.name] = trainer
        samples: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(rounds):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                samples[name].append(steps * trainer.tokens_per_step() / (time.perf_counter() - t0))
            log(f"compare: throughput round {r + 1}/{rounds}")
    return {"settings": {"rounds": rounds, "steps": steps, "threads": threads, "batch_size": base.batch_size,
                         "seq_len": base.seq_len},
            "machine": machine_description(threads),
            "tokens_per_s": {n: statistics.median(s) for n, s in samples.items()},
            "samples": samples}


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {threads} torch thread(s), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def throughput_cached(out: Path, base: TrainConfig, variants: Sequence[Variant], rounds: int, steps: int,
                      threads: int, log: Callable[[str], None] = print) -> dict | None:
    """The throughput benchmark's result in OUT/throughput.json, measured if missing or stale."""
    if rounds <= 0:
        return None
    path = Path(out) / "throughput.json"
    want = {"rounds": rounds, "steps": steps, "threads": threads, "batch_size": base.batch_size,
            "seq_len": base.seq_len}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("settings") == want and set(stored["tokens_per_s"]) >= {v.name for v in variants}:
            return stored
    log("compare: measuring training throughput (interleaved, fresh models)")
    result = measure_throughput(base, variants, rounds=rounds, steps=steps, threads=threads, log=log)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def tokens_at(result: dict, step: int) -> int:
    return step * result["tokens_per_step"]


def val_at(result: dict, step: int) -> float:
    """Mean validation loss over domains at an evaluated step (NaN if that step was not evaluated)."""
    for row in result["curve"]:
        if row["step"] == step and "val" in row:
            return sum(row["val"].values()) / len(row["val"])
    return math.nan
