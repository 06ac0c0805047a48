"""A run's checkpoints: `checkpoints/step-NNNNNN` directories (the model in the released
safetensors layout plus `trainer.pt`: step, optimizer, RNG and router state, loaded with
weights_only) and a `latest` file naming the one to resume from.

At every instant `latest` names a complete checkpoint: a new one is written in full under a
temporary name (`begin_checkpoint`) and renamed into place, then `latest` is switched atomically,
and only then are older ones removed (`commit_checkpoint`). A step is saved once; the directory
`latest` names is never rewritten. Under expert parallelism every rank writes its part into the
same staging directory and rank 0 commits only after all of them have finished
(moge.train.distributed).

The optimizer state is keyed by parameter name so it loads at any expert-parallel size. Saved from
one process, it is all in trainer.pt. Saved by expert-parallel ranks, the per-expert state tensors
stay where they are: EP rank r writes `optimizer-experts-0000{r+1}-of-0000{ep}.pt` with its experts'
rows, trainer.pt has the rest and lists the part files, and `read_optimizer_state` puts back the
rows a loader needs (all of them, or one rank's at another EP size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from moge.io import atomic_write_text
from moge.train.config import TrainConfig, TrainingError

LATEST = "latest"
TRAINER_STATE = "trainer.pt"
# a resumed run must see the same model, batches and balance loss as the run that saved
RESUME_KEYS = ("model", "batch_size", "seq_len", "grad_accum", "seed", "aux_scope", "init", "domain_weights")
# what a staged run's phases replace: checked phase by phase instead
PHASED_KEYS = ("batch_size", "seq_len", "domain_weights")


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


def staging_dir(root: Path, step: int) -> Path:
    """Where `step`'s checkpoint is written before it is committed."""
    return root / f".tmp-{step_dir(root, step).name}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """An empty staging directory for `step`, after removing any a crash during an earlier save left."""
    check_unsaved(root, step)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale)
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True)
    return tmp


TOKENIZER_SIDECARS = ("tokenizer_config.json",)  # the Hugging Face file's special-token names


def copy_tokenizer(tokenizer: str | Path | None, directory: Path) -> None:
    if tokenizer is not None and Path(tokenizer).exists():  # so `moge generate --model CKPT` has it
        shutil.copy2(tokenizer, directory / Path(tokenizer).name)
        for name in TOKENIZER_SIDECARS:  # EOS / pad names live beside a tokenizer.json
            side = Path(tokenizer).parent / name
            if side.is_file() and side.name != Path(tokenizer).name:
                shutil.copy2(side, directory / name)


def commit_checkpoint(root: Path, step: int, keep: int = 2) -> Path:
    """Rename the complete staging directory to step-NNNNNN, point `latest` at it, then keep only
    the `keep` newest checkpoints up to this step."""
    final = step_dir(root, step)
    if final.exists():  # from a later step of an abandoned run that was resumed earlier; `latest` is elsewhere
        shutil.rmtree(final)
    os.replace(staging_dir(root, step), final)
    atomic_write_text(root / LATEST, final.name + "\n")
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name < final.name)
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def write_checkpoint(root: Path, step: int, model: nn.Module, weights: dict[str, torch.Tensor], state: dict, *,
                     tokenizer: str | Path | None = None, keep: int = 2) -> Path:
    """Write step-NNNNNN from one process, point `latest` at it, then keep only the `keep` newest
    checkpoints up to this step (see the module docstring for the order)."""
    from moge.checkpoint import save_pretrained

    tmp = begin_checkpoint(root, step)
    save_pretrained(model, tmp, state_dict=weights)
    copy_tokenizer(tokenizer, tmp)
    torch.save(state, tmp / TRAINER_STATE)
    return commit_checkpoint(root, step, keep)


def trainer_state(step: int, cfg: TrainConfig, model: nn.Module) -> dict:
    """Everything besides the weights and the optimizer state ("optimizer_by_name", added by the
    `Processes` that saves) that a resumed run needs to continue bit-identically."""
    state = {"step": step, "rng_cpu": torch.get_rng_state(),
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
    defaults = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} | {"init": "", "domain_weights": {},
                                                                                 "phases": []}
    phased = bool(cfg.phases) or bool(saved.get("phases"))
    for key in RESUME_KEYS:
        if phased and key in PHASED_KEYS:
            continue
        was = saved.get(key, defaults[key])
        if was != getattr(cfg, key):
            raise TrainingError(f"cannot resume {path}: {key}={getattr(cfg, key)!r} differs from the "
                                f"checkpoint's {was!r}; use the same value or a new --out")
    if phased:
        check_phases_match(path, saved, cfg, int(state["step"]))
    return state


def check_phases_match(path: Path, saved: dict, cfg: TrainConfig, step: int) -> None:
    """A staged run resumes when every phase the checkpoint has begun is unchanged; later phases
    (those starting at or after its step) may be changed, added or removed."""
    was = type(cfg)(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                       **{k: saved[k] for k in ("steps", "batch_size", "seq_len", "lr", "min_lr", "warmup")
                          if k in saved},
                       "phases": saved.get("phases", []), "domain_weights": saved.get("domain_weights", {})})
    old, new = was.phase_list(), cfg.phase_list()
    begun = [p for p in old if p.start < step]
    for i, p in enumerate(begun):
        if i >= len(new) or new[i] != p:
            now = new[i] if i < len(new) else "none"
            raise TrainingError(f"cannot resume {path} at step {step}: phase {i} ({p.name}) has begun and differs: "
                                f"checkpoint {p}, now {now}; change only phases that start at step >= {step}, "
                                f"or use a new --out")


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


def expert_part_name(ep_rank: int, ep: int) -> str:
    """The optimizer-state file of EP rank `ep_rank` (0-based) of `ep`."""
    return f"optimizer-experts-{ep_rank + 1:05d}-of-{ep:05d}.pt"


def split_optimizer_state(by_name: dict, sharded: Mapping[str, tuple[range, int]],
                          files: list[str]) -> tuple[dict, dict]:
    """(rest, part) of this rank's `optimizer_state_by_name` (without a `whole` hook). `sharded`
    maps every parameter this rank holds a shard of to (its rows here, its rows in the whole model).
    The part has those parameters' per-row state tensors, as they are (no copy); rest has every
    other entry and names the part `files` of all ranks, for `read_optimizer_state`."""
    rest, part = {}, {}
    for name, entry in by_name["state"].items():
        if name not in sharded:
            rest[name] = entry
            continue
        rows = sharded[name][0]
        part[name] = {k: v for k, v in entry.items() if torch.is_tensor(v) and v.dim() and v.shape[0] == len(rows)}
        rest[name] = {k: v for k, v in entry.items() if k not in part[name]}
    parts = {"files": list(files), "rows": {name: whole for name, (_, whole) in sharded.items()}}
    return ({**by_name, "state": rest, "expert_parts": parts},
            {"state": part, "first_row": {name: rows.start for name, (rows, _) in sharded.items()}})


def read_optimizer_state(path: Path, by_name: dict, rows: Callable[[str, int], range] | None = None) -> dict:
    """`by_name` (trainer.pt's "optimizer_by_name") with the per-expert state kept in part files put
    back, as `load_optimizer_state_by_name` takes it: for each sharded parameter the rows
    `rows(name, whole rows)` (default: all; an expert-parallel rank asks for its own experts). The
    part files are memory-mapped, so only the rows asked for are read. A checkpoint saved from one
    process has no parts and is returned as it is."""
    parts = by_name.get("expert_parts")
    if not parts:
        return by_name
    state = {name: dict(entry) for name, entry in by_name["state"].items()}
    wanted = {name: range(whole) if rows is None else rows(name, whole) for name, whole in parts["rows"].items()}
    pieces: dict[tuple[str, str], list[tuple[int, Tensor]]] = {}
    for file in parts["files"]:
        try:
            part = torch.load(path / file, weights_only=True, map_location="cpu", mmap=True)
        except FileNotFoundError:
            raise TrainingError(f"{path / file} is missing: {path / TRAINER_STATE} lists it among the optimizer "
                                f"state's expert parts {parts['files']}") from None
        for name, entry in part["state"].items():
            first, want = part["first_row"][name], wanted[name]
            for key, value in entry.items():
                lo, hi = max(want.start, first), min(want.stop, first + value.shape[0])
                if lo < hi:
                    pieces.setdefault((name, key), []).append((lo, value[lo - first:hi - first]))
    for (name, key), got in pieces.items():
        got.sort(key=lambda p: p[0])
        if sum(len(v) for _, v in got) != len(wanted[name]):
            raise TrainingError(f"the optimizer state's expert parts {parts['files']} in {path} do not cover rows "
                                f"{wanted[name].start}..{wanted[name].stop - 1} of {name}.{key}")
        state[name][key] = torch.cat([v for _, v in got])  # a copy: the mapped files can close
    return {k: v for k, v in by_name.items() if k != "expert_parts"} | {"state": state}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from, so the log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
