"""Staged pretraining and --init: phases change sequence length, batch size, learning rate and data
mixture by step, resume across a phase boundary is bit-exact, and a run can start from weights."""

import json

import pytest
import torch

from moge.checkpoint import save_pretrained
from moge.cli import main
from moge.train.config import TrainConfig, TrainingError
from moge.train.data import load_data
from moge.train.optim import lr_at, phase_lr
from moge.train.trainer import Trainer

PHASES = [{"name": "general", "steps": 3, "seq_len": 16, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup": 1},
          {"name": "reasoning", "steps": 3, "seq_len": 32, "batch_size": 2, "lr": 5e-3, "min_lr": 5e-4, "warmup": 0,
           "weights": {"verse": 1.0, "prose": 0.0}}]


def _cfg(corpus, out, **kw):
    base = dict(model=str(corpus / "tiny.json"), data=str(corpus / "data"), out=str(out), batch_size=4, seq_len=16,
                eval_every=100, eval_windows=2, save_every=100, phases=PHASES)
    return TrainConfig(**(base | kw))


def test_phases_set_steps_shapes_lr_and_mixture(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run")
    assert cfg.steps == 6 and [p.start for p in cfg.phase_list()] == [0, 3]
    assert cfg.phase_at(2).name == "general" and cfg.phase_at(3).name == "reasoning"
    # each phase has its own warmup + cosine: the second starts at its own peak lr
    assert phase_lr(0, cfg) == pytest.approx(1e-2) and phase_lr(3, cfg) == pytest.approx(5e-3)
    assert phase_lr(5, cfg) == pytest.approx(lr_at(2, TrainConfig(steps=3, lr=5e-3, min_lr=5e-4, warmup=0)))
    trainer = Trainer(cfg, load_data(cfg))
    seen = []
    original = trainer.data.train_batch

    def spy(step, micro, batch_size, **kw):
        out = original(step, micro, batch_size, **kw)
        seen.append((step, tuple(out.shape)))
        return out

    trainer.data.train_batch = spy
    rows = [trainer.train_step() for _ in range(6)]
    assert [s for _, s in seen] == [(4, 17)] * 3 + [(2, 33)] * 3
    assert [r["phase"] for r in rows] == ["general"] * 3 + ["reasoning"] * 3
    # the second phase draws from the verse domain only: every window is a slice of its shard
    shard = trainer.data.shards.tokens("train", "verse")
    batch = original(4, 0, 2, seq_len=32, weights={"verse": 1.0, "prose": 0.0})
    for row in batch.numpy():
        text = shard.tobytes()
        assert row.astype(shard.dtype).tobytes() in text


@pytest.mark.parametrize("stop", [2, 3, 4], ids=["inside-first", "at-boundary", "inside-second"])
def test_resume_across_a_phase_change_is_bit_exact(corpus, tmp_path, stop):
    full = Trainer(_cfg(corpus, tmp_path / "a"), load_data(_cfg(corpus, tmp_path / "a")))
    expected = [full.train_step()["ce"] for _ in range(6)]
    cfg = _cfg(corpus, tmp_path / "b")
    first = Trainer(cfg, load_data(cfg))
    got = [first.train_step()["ce"] for _ in range(stop)]
    first.save()
    del first
    second = Trainer(cfg, load_data(cfg))
    assert second.resume() and second.step == stop
    got += [second.train_step()["ce"] for _ in range(6 - stop)]
    assert got == expected  # fp32 on CPU: identical floats


def test_later_phases_may_change_on_resume_but_begun_ones_may_not(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run")
    trainer = Trainer(cfg, load_data(cfg))
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    longer = [PHASES[0], PHASES[1] | {"steps": 5}, {"name": "anneal", "steps": 2, "lr": 1e-3, "min_lr": 1e-4}]
    again = Trainer(_cfg(corpus, tmp_path / "run", phases=longer), load_data(cfg))
    assert again.resume() and again.cfg.steps == 10
    changed = [PHASES[0] | {"lr": 2e-2}, PHASES[1]]
    with pytest.raises(TrainingError, match=r"phase 0 \(general\) has begun and differs"):
        Trainer(_cfg(corpus, tmp_path / "run", phases=changed), load_data(cfg)).resume()


@pytest.mark.parametrize("phases,pattern", [
    ([{"steps": 0}], r"phases\[0\].steps=0 is invalid"),
    ([{"steps": 2, "seqlen": 8}], r"phases\[0\] has unknown keys \['seqlen'\]"),
    ([{"steps": 2, "lr": 1e-3, "min_lr": 1e-2}], r"phases\[0\]: lr=0.001, min_lr=0.01"),
    ([{"steps": 2, "weights": {"verse": -1}}], r"phases\[0\].weights\['verse'\]=-1 is invalid"),
    ("x", "phases='x' is invalid"),
    ([{"lr": 1e-3}], r"phases\[0\] has no 'steps'"),
])
def test_bad_phases(phases, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(phases=phases)


def test_a_mixture_naming_an_unknown_domain_fails_before_training(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", phases=[PHASES[0], PHASES[1] | {"weights": {"verse": 1, "poetry": 1}}])
    with pytest.raises(ValueError, match=r"phases\[1\].weights names \['poetry'\], not in the corpus"):
        Trainer(cfg, load_data(cfg))
    assert not (tmp_path / "run").exists()


def test_a_staged_run_saves_at_each_phase_boundary_and_logs_the_phase(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", keep_checkpoints=5)
    Trainer(cfg, load_data(cfg)).fit(progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert names == ["step-000003", "step-000006"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["general"] * 3 + ["reasoning"] * 3


def test_init_starts_from_the_weights_with_a_fresh_optimizer(corpus, tmp_path, capsys):
    cfg = _cfg(corpus, tmp_path / "pre", phases=[])
    pre = Trainer(cfg, load_data(cfg))
    for _ in range(2):
        pre.train_step()
    save_pretrained(pre.model, tmp_path / "ckpt")
    init = Trainer(_cfg(corpus, tmp_path / "next", phases=[], init=str(tmp_path / "ckpt"), seed=7), load_data(cfg))
    assert all(torch.equal(a, b) for a, b in zip(pre.model.state_dict().values(), init.model.state_dict().values()))
    assert not init.optimizer.state  # fresh AdamW
    # the CLI flag; a checkpoint whose vocabulary is too small for the data is refused by name
    common = ["--data", str(corpus / "data"), "--batch-size", "2", "--seq-len", "8", "--steps", "1",
              "--eval-every", "1", "--eval-windows", "1", "--no-progress"]
    assert main(["train", *common, "--init", str(tmp_path / "ckpt"), "--out", str(tmp_path / "cli")]) == 0
    small = pre.model_cfg.replace(vocab_size=50)
    from moge.nn.model import PanguProMoEForCausalLM

    save_pretrained(PanguProMoEForCausalLM(small).init_weights(seed=0), tmp_path / "small")
    assert main(["train", *common, "--init", str(tmp_path / "small"), "--out", str(tmp_path / "cli2")]) == 2
    assert "vocab_size=50 is smaller than the data's" in capsys.readouterr().err
