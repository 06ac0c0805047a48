"""A run's checkpoints: `checkpoints/step-NNNNNN` directories (the model in the released
safetensors layout plus `trainer.pt`: step, optimizer, RNG and router state, loaded with
weights_only) and a `latest` file naming the one to resume from.

At every instant `latest` names a complete checkpoint: a new one is written in full under a
temporary name and renamed into place, then `latest` is switched atomically, and only then are
older ones removed. A step is saved once; the directory `latest` names is never rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from moge.io import atomic_write_text
from moge.train.config import TrainConfig, TrainingError

LATEST = "latest"
TRAINER_STATE = "trainer.pt"
# a resumed run must see the same model, batches and balance loss as the run that saved
RESUME_KEYS = ("model", "batch_size", "seq_len", "grad_accum", "seed", "aux_scope")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, None before the first save; an error if it is incomplete."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_STATE).exists():
        raise TrainingError(f"{pointer} points to {path}, which is missing or incomplete")
    return path


def check_unsaved(root: Path, step: int) -> None:
    """Refuse to save `step` again when `latest` already names it: rewriting the checkpoint a crash
    would resume from is the one write that cannot be made safe."""
    pointer = root / LATEST
    if pointer.exists() and pointer.read_text().strip() == step_dir(root, step).name:
        raise TrainingError(f"step {step} is already saved in {step_dir(root, step)} and {pointer} names it; "
                            f"resume the run to continue it, or choose another --out")


def write_checkpoint(root: Path, step: int, model: nn.Module, weights: dict[str, torch.Tensor], state: dict, *,
                     tokenizer: str | Path | None = None, keep: int = 2) -> Path:
    """Write step-NNNNNN, point `latest` at it, then keep only the `keep` newest checkpoints up to
    this step (see the module docstring for the order)."""
    from moge.checkpoint import save_pretrained

    check_unsaved(root, step)
    final = step_dir(root, step)
    for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale)
    tmp = root / f".tmp-{final.name}"
    save_pretrained(model, tmp, state_dict=weights)
    if tokenizer is not None and Path(tokenizer).exists():  # so `moge generate --model CKPT` has it
        shutil.copy2(tokenizer, tmp / Path(tokenizer).name)
    torch.save(state, tmp / TRAINER_STATE)
    if final.exists():  # from a later step of an abandoned run that was resumed earlier; `latest` is elsewhere
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name < final.name)
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def trainer_state(step: int, cfg: TrainConfig, optimizer_by_name: dict, model: nn.Module) -> dict:
    """Everything besides the weights that a resumed run needs to continue bit-identically."""
    state = {"step": step, "optimizer_by_name": optimizer_by_name, "rng_cpu": torch.get_rng_state(),
             "train_config": json.dumps(dataclasses.asdict(cfg)),
             "routers": {name: buf.clone() for name, buf in model.named_buffers()
                         if name.endswith("tokens_per_expert")}}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


def read_trainer_state(path: Path, cfg: TrainConfig) -> dict:
    """trainer.pt of checkpoint `path`, after checking it belongs to a run like `cfg`."""
    state = torch.load(path / TRAINER_STATE, weights_only=True, map_location="cpu")
    saved = json.loads(state["train_config"])
    for key in RESUME_KEYS:
        if saved[key] != getattr(cfg, key):
            raise TrainingError(f"cannot resume {path}: {key}={getattr(cfg, key)!r} differs from the "
                                f"checkpoint's {saved[key]!r}; use the same value or a new --out")
    return state


def restore_rng_and_routers(state: dict, model: nn.Module) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    buffers = dict(model.named_buffers())
    for name, value in state.get("routers", {}).items():
        buffers[name].copy_(value)


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module,
                            whole: Callable[[str, Tensor, nn.Parameter], Tensor] | None = None) -> dict:
    """{"state": {param name: {key: tensor}}, "param_groups": [... "params": [names]]}: the layout
    that loads at any expert-parallel size. `whole(name, value, param)` turns a rank's shard of a
    state tensor into the whole model's (expert parallel: gathered over the EP group; collective)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            state[name] = {key: whole(name, value, p) if whole is not None and torch.is_tensor(value) else value
                           for key, value in optimizer.state.get(p, {}).items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict,
                                 local: Callable[[str, Tensor, nn.Parameter], Tensor] | None = None) -> None:
    """Inverse of `optimizer_state_by_name`. `local(name, value, param)` cuts a whole-model state
    tensor down to this rank's shard (expert parallel); every tensor must then have its parameter's
    shape."""
    names = {id(p): n for n, p in model.named_parameters()}
    index: dict[str, int] = {}
    groups = []
    for g_new, g_old in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        mine = [names[id(p)] for p in g_new["params"]]
        if mine != g_old["params"]:
            raise TrainingError("the optimizer's parameters differ from the checkpoint's: "
                                f"{sorted(set(mine) ^ set(g_old['params']))[:5]}")
        groups.append({k: v for k, v in g_old.items() if k != "params"}
                      | {"params": list(range(len(index), len(index) + len(mine)))})
        index.update({n: len(index) + i for i, n in enumerate(mine)})
    params = dict(model.named_parameters())
    state = {}
    for name, entry in saved["state"].items():
        if not entry:
            continue
        mine = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim():
                if local is not None:
                    value = local(name, value, params[name])
                if value.shape != params[name].shape:
                    raise TrainingError(f"optimizer state {name}.{key} has shape {tuple(value.shape)}, the "
                                        f"parameter has {tuple(params[name].shape)}")
            mine[key] = value.clone() if torch.is_tensor(value) else value
        state[index[name]] = mine
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from, so the log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
