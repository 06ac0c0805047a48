"""Trainer: learning, exact resume, signals, non-finite losses, CLI end to end on a generated corpus."""

import dataclasses
import json
import signal

import pytest
import torch

from moge.cli import main
from moge.errors import ConfigError
from moge.train.config import TrainConfig, TrainingError
from moge.train.data import load_data
from moge.train.trainer import Trainer


def _cfg(corpus, tmp_path, **kw):
    base = dict(model=str(corpus / "tiny.json"), data=str(corpus / "data"), out=str(tmp_path / "run"), steps=12,
                batch_size=4, seq_len=16, warmup=2, lr=1e-2, eval_every=6, eval_windows=4, save_every=6)
    return TrainConfig(**(base | kw))


def test_loss_decreases_and_metrics_are_logged(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, steps=40, eval_every=20, save_every=20)
    summary = Trainer(cfg, load_data(cfg)).fit(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[-1]["step"] == 40
    first, last = sum(r["ce"] for r in rows[:5]) / 5, sum(r["ce"] for r in rows[-5:]) / 5
    assert last < 0.7 * first
    assert set(summary["val"]) == {"verse", "prose"}
    assert all(r["imbalance"] == 0.0 for r in rows)  # MoGE: every batch is balanced across the 4 devices
    assert "aux" in rows[0] and "z" in rows[0]


def test_resume_continues_exactly(corpus, tmp_path):
    full = Trainer(_cfg(corpus, tmp_path / "a"), load_data(_cfg(corpus, tmp_path / "a")))
    losses_full = [full.train_step()["ce"] for _ in range(10)]

    cfg = _cfg(corpus, tmp_path / "b")
    first = Trainer(cfg, load_data(cfg))
    losses = [first.train_step()["ce"] for _ in range(4)]
    first.save()
    del first
    second = Trainer(cfg, load_data(cfg))
    assert second.resume() and second.step == 4
    losses += [second.train_step()["ce"] for _ in range(6)]
    assert losses == losses_full  # bit-identical in fp32 on CPU


def test_signal_saves_and_resume_finishes_the_run(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    original = trainer.train_step

    def step_then_interrupt():
        row = original()
        if trainer.step == 5:
            trainer._on_signal(signal.SIGINT, None)
        return row

    trainer.train_step = step_then_interrupt
    summary = trainer.fit(progress=False)
    assert summary["interrupted"] and summary["step"] == 5
    assert trainer.latest_checkpoint().name == "step-000005"
    again = Trainer(cfg, load_data(cfg))
    assert again.resume()
    assert again.fit(progress=False)["step"] == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path)
    trainer = Trainer(cfg, load_data(cfg))
    trainer.train_step()
    good = trainer.save()
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss .* at step 1.*step-000001"):
        trainer.train_step()
    assert trainer.latest_checkpoint() == good


@pytest.mark.parametrize("scope", ["global", "local"])
def test_other_aux_scopes_and_topk_train(corpus, tmp_path, scope):
    cfg = _cfg(corpus, tmp_path, steps=3, aux_scope=scope, grad_accum=2)
    rows = [Trainer(cfg, load_data(cfg)).train_step() for _ in range(1)]
    assert rows[0]["aux"] > 0
    # MoGE loads the 4 devices exactly evenly on every batch; top-K on 64 random-init tokens does not
    assert rows[0]["imbalance"] == 0 and rows[0]["device_max_over_mean"] == 1
    topk = _cfg(corpus, tmp_path / "t", model=str(corpus / "tiny-topk.json"), steps=3)
    row = Trainer(topk, load_data(topk)).train_step()
    assert row["imbalance"] > 0 and row["device_max_over_mean"] > 1


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(steps=0), "steps=0 is invalid"),
    (dict(aux_scope="batch"), "aux_scope='batch' is invalid"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr"),
    (dict(beta2=1.0), "beta2=1.0"),
])
def test_bad_train_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)


def test_cli_train_resume_analyze_end_to_end(corpus, tmp_path, capsys):
    common = ["--model", str(corpus / "tiny.json"), "--data", str(corpus / "data"), "--out", str(tmp_path / "run"),
              "--batch-size", "4", "--seq-len", "16", "--warmup", "1", "--eval-every", "3", "--save-every", "3",
              "--eval-windows", "2", "--no-progress"]
    assert main(["train", *common, "--steps", "3"]) == 0
    assert main(["train", *common, "--steps", "3"]) == 2  # refuses to overwrite a run
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", *common, "--steps", "6", "--resume", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["step"] == 6
    ckpt = tmp_path / "run" / "checkpoints" / "step-000006"
    assert (ckpt / "model.safetensors.index.json").exists() and (ckpt / "trainer.pt").exists()
    assert main(["analyze", "--ckpt", str(ckpt), "--data", str(corpus / "data"), "--seq-len", "16",
                 "--windows", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert all(layer["coactivation_same_group_pairs"] == 0 for layer in summary["layers"])
    # the checkpoint carries the corpus tokenizer, so it generates from text (a tokenizer without BOS)
    assert main(["generate", "--model", str(ckpt), "--prompt", "thou art", "--max-new-tokens", "3", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert len(gen["completions"][0]["tokens"]) <= 3 and gen["decode_tokens_per_s"] > 0
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "moge data prepare" in capsys.readouterr().err


def test_lr_schedule_shape():
    from moge.train.optim import lr_at

    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert dataclasses.asdict(cfg)["steps"] == 100


@pytest.mark.slow
def test_quickstart_main_job_end_to_end(tmp_path, capsys):
    """The README's main job on the real corpus (downloads on first use)."""
    assert main(["quickstart", "--steps", "3", "--out", str(tmp_path / "qs"), "--max-new-tokens", "5", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["steps"] == 3
    assert all(v["imbalance_score_mean"] == 0.0 for v in result["balance"].values())


def test_aux_free_bias_updates_every_router_including_the_mtp_module(corpus, tmp_path):
    # one step: a second sign update can take a bias straight back to zero
    cfg = _cfg(corpus, tmp_path, steps=1, bias_update_rate=0.01, aux_alpha=0.0, mtp_modules=1, mtp_loss_weight=0.3)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    trainer.fit(progress=False)
    biases = {n: b for n, b in trainer.model.named_buffers() if n.endswith("expert_bias")}
    assert len(biases) == trainer.model_cfg.num_layers + 1  # the MTP module's router too
    assert all(b.abs().sum() > 0 for b in biases.values()), biases


def test_local_aux_loss_needs_the_grouped_router(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, model=str(corpus / "tiny-topk.json"), aux_scope="local")
    with pytest.raises(ConfigError, match="aux_scope='local' needs router='grouped'"):
        Trainer(cfg, load_data(cfg))
