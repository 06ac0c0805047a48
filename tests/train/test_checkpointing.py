"""Checkpoints of a run: a step is saved once, `latest` always names a complete checkpoint (also
when the process dies in the middle of a save), and single-process training never loads the
parallel layer."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from moge.checkpoint import load_pretrained
from moge.train.checkpointing import TRAINER_STATE
from moge.train.config import TrainConfig, TrainingError
from moge.train.data import load_data
from moge.train.trainer import Trainer


def _cfg(corpus, out, **kw):
    base = dict(model=str(corpus / "tiny.json"), data=str(corpus / "data"), out=str(out), steps=12,
                batch_size=4, seq_len=16, warmup=2, lr=1e-2, eval_every=100, eval_windows=2, save_every=6)
    return TrainConfig(**(base | kw))


def _interrupt_at(trainer: Trainer, step: int) -> None:
    """Deliver SIGINT (as the signal handler would) right after `step` finishes."""
    original = trainer.train_step

    def step_then_interrupt():
        row = original()
        if trainer.step == step:
            trainer._on_signal(signal.SIGINT, None)
        return row

    trainer.train_step = step_then_interrupt


def _weights(path):
    return load_pretrained(path).state_dict()


def test_stop_on_a_save_step_saves_that_step_once(corpus, tmp_path, monkeypatch):
    saved_states = []
    real_save = torch.save

    def counting_save(obj, f, *args, **kwargs):
        if str(f).endswith("trainer.pt"):
            saved_states.append(obj["step"])
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", counting_save)
    cfg = _cfg(corpus, tmp_path / "run")
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    _interrupt_at(trainer, 6)  # 6 is a save step
    summary = trainer.fit(progress=False)
    assert summary["interrupted"] and summary["step"] == 6
    assert saved_states == [6]
    assert trainer.latest_checkpoint().name == "step-000006"
    trainer.save()  # asking again at the same step writes nothing
    assert saved_states == [6]


class Crash(BaseException):
    """The process dies here (BaseException: no `except Exception` may swallow it)."""


class DieAfter:
    """Wraps file operations; the k-th one completes, then the process dies."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def wrap(self, real):
        def op(*args, **kwargs):
            real(*args, **kwargs)
            self.calls += 1
            if self.calls == self.k:
                raise Crash(f"died after file operation {self.k}")
        return op


@pytest.fixture
def stopped_at_six(corpus, tmp_path):
    """The reference run (12 steps, checkpoints at 6 and 12), and a copy of it as a run that stopped
    after step 6: `latest` names step-000006, a step-000012 from the abandoned future is on disk."""
    ref = _cfg(corpus, tmp_path / "ref")
    Trainer(ref, load_data(ref), log=lambda _m: None).fit(progress=False)
    run = tmp_path / "stopped"
    shutil.copytree(tmp_path / "ref", run)
    (run / "checkpoints" / "latest").write_text("step-000006\n")
    return _weights(tmp_path / "ref" / "checkpoints" / "step-000012"), run


def test_crash_at_any_point_of_a_save_leaves_a_resumable_checkpoint(corpus, tmp_path, stopped_at_six, monkeypatch):
    """Resume at step 6 and stop by signal at step 12 (a save step that replaces an existing
    step-000012); the process dies after the k-th file removal or rename of the save, for every k.
    Each time `latest` still names a complete checkpoint, and resuming from it finishes the run with
    the reference's weights, bit for bit."""
    want, stopped = stopped_at_six
    for k in range(1, 60):
        run = tmp_path / f"crash{k}"
        shutil.copytree(stopped, run)
        cfg = _cfg(corpus, run)
        trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
        assert trainer.resume() and trainer.step == 6
        _interrupt_at(trainer, 12)
        with monkeypatch.context() as patch:
            die = DieAfter(k)
            patch.setattr(shutil, "rmtree", die.wrap(shutil.rmtree))
            patch.setattr(os, "replace", die.wrap(os.replace))
            try:
                trainer.fit(progress=False)
                crashed = False
            except Crash:
                crashed = True

        latest = Trainer(cfg, load_data(cfg)).latest_checkpoint()  # raises if it names a missing directory
        assert latest.name in ("step-000006", "step-000012"), (k, latest)
        again = Trainer(cfg, load_data(cfg), log=lambda _m: None)
        assert again.resume()
        again.fit(progress=False)
        got = _weights(again.latest_checkpoint())
        assert all(torch.equal(got[name], want[name]) for name in want), k
        if not crashed:  # k is past the last file operation of the save: every point was tried
            assert k > 3
            break
    else:
        pytest.fail("the save never finished without a crash")


def test_saving_over_the_checkpoint_latest_names_is_refused(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", steps=2, save_every=2)
    Trainer(cfg, load_data(cfg), log=lambda _m: None).fit(progress=False)
    before = _weights(tmp_path / "run" / "checkpoints" / "step-000002")
    fresh = Trainer(cfg, load_data(cfg), log=lambda _m: None)  # not resumed: would save step 2 again
    fresh.train_step()
    fresh.train_step()
    with pytest.raises(TrainingError, match="step 2 is already saved in .*step-000002.*resume the run"):
        fresh.save()
    after = _weights(fresh.latest_checkpoint())
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_single_process_training_does_not_load_the_parallel_layer(corpus, tmp_path):
    script = f"""
import sys
from moge.train.config import TrainConfig
from moge.train.data import load_data
from moge.train.trainer import Trainer
import moge.commands.train
cfg = TrainConfig(model={str(corpus / "tiny.json")!r}, data={str(corpus / "data")!r}, out={str(tmp_path / "run")!r},
                  steps=1, batch_size=2, seq_len=8, eval_every=1, eval_windows=1, save_every=1)
trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
trainer.fit(progress=False)
assert trainer.resume() and trainer.step == 1
loaded = sorted(m for m in sys.modules if m.startswith("moge.parallel") or m == "moge.train.distributed")
print(loaded)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_optimizer_state_split_over_expert_parallel_ranks_reads_back_at_any_size(tmp_path):
    """The per-rank optimizer parts written at EP=2 give back, at EP=4 or in one process, exactly
    the rows one process would hold; a missing part file is an error naming it."""
    from moge.train.checkpointing import expert_part_name, read_optimizer_state, split_optimizer_state

    torch.manual_seed(0)
    whole = {"state": {"mlp.experts.w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 3)},  # 8 experts
                       "norm.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(5)}},
             "param_groups": [{"lr": 0.1, "params": ["mlp.experts.w", "norm.weight"]}]}
    files = [expert_part_name(r, 2) for r in range(2)]
    assert files == ["optimizer-experts-00001-of-00002.pt", "optimizer-experts-00002-of-00002.pt"]
    for r in range(2):  # what EP rank r of 2 holds and writes
        rows = range(4 * r, 4 * r + 4)
        exp_avg = whole["state"]["mlp.experts.w"]["exp_avg"][rows.start:rows.stop]
        mine = {"state": {"mlp.experts.w": {"step": torch.tensor(3.0), "exp_avg": exp_avg},
                          "norm.weight": whole["state"]["norm.weight"]}, "param_groups": whole["param_groups"]}
        rest, part = split_optimizer_state(mine, {"mlp.experts.w": (rows, 8)}, files)
        assert "exp_avg" not in rest["state"]["mlp.experts.w"]  # the expert rows stay in this rank's file
        torch.save(part, tmp_path / files[r])
    torch.save({"optimizer_by_name": rest}, tmp_path / TRAINER_STATE)
    saved = torch.load(tmp_path / TRAINER_STATE, weights_only=True)["optimizer_by_name"]

    one = read_optimizer_state(tmp_path, saved)
    assert "expert_parts" not in one and one["param_groups"] == whole["param_groups"]
    for name, entry in whole["state"].items():
        assert all(torch.equal(one["state"][name][k], v) for k, v in entry.items()), name
    for r in range(4):  # EP rank r of 4 asks for its 2 experts only
        quarter = read_optimizer_state(tmp_path, saved, lambda _name, n, r=r: range(r * n // 4, (r + 1) * n // 4))
        assert torch.equal(quarter["state"]["mlp.experts.w"]["exp_avg"],
                           whole["state"]["mlp.experts.w"]["exp_avg"][2 * r:2 * r + 2])
    # a checkpoint saved from one process has no parts: returned unchanged
    assert read_optimizer_state(tmp_path, whole) is whole
    (tmp_path / files[1]).unlink()
    with pytest.raises(TrainingError, match="optimizer-experts-00002-of-00002.pt is missing"):
        read_optimizer_state(tmp_path, saved)
