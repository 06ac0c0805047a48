"""`moge compare` as a seeds study: statistics against hand calculations, the seed/data-order
pairing, skipping finished runs, the report, and the command end to end on a generated corpus."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moge.cli import main
from moge.errors import ConfigError
from moge.train import compare
from moge.train.compare import VARIANTS, run_study, select_variants
from moge.train.compare_report import write_report
from moge.train.config import TrainConfig
from moge.train.data import TrainData, load_data
from moge.train.stats import betainc, paired_difference, summarize, t_cdf, t_quantile


def _base(corpus, tmp_path, **kw):
    base = dict(data=str(corpus / "data"), out=str(tmp_path / "cmp"), steps=6, batch_size=2, seq_len=16, warmup=1,
                eval_every=3, eval_windows=2, save_every=3, threads=1)
    return TrainConfig(**(base | kw))


# ---- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("df, q975", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (9, 2.262157),
                                      (30, 2.042272), (1000, 1.962339)])
def test_t_quantile_matches_published_tables(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-q975, abs=2e-6)


def test_t_cdf_closed_forms():
    # df=1 is the Cauchy distribution; df=2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - (0.6^4 + 4 * 0.4 * 0.6^3)


def test_summary_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 over n-1 = 3
    half = 3.182446 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * std / sqrt(4)
    assert (s.lo, s.hi) == (pytest.approx(2.5 - half, abs=1e-5), pytest.approx(2.5 + half, abs=1e-5))
    assert s.excludes_zero()  # [0.446, 4.554]
    assert not summarize([-1.0, 1.0, 2.0]).excludes_zero()  # mean 0.667, half-width 4.303 * 1.528 / sqrt(3)
    one = summarize([5.0])
    assert one.mean == 5.0 and math.isnan(one.std) and not one.excludes_zero()
    with pytest.raises(ValueError):
        summarize([])


def test_paired_difference_by_hand():
    # per-seed differences -0.10, -0.12, -0.08: mean -0.10, std 0.02, half-width 4.302653 * 0.02 / sqrt(3)
    d = paired_difference([5.00, 4.90, 5.10], [5.10, 5.02, 5.18])
    assert d.mean == pytest.approx(-0.10)
    assert d.std == pytest.approx(0.02)
    assert d.hi == pytest.approx(-0.10 + 4.302653 * 0.02 / math.sqrt(3), abs=1e-6)
    assert d.excludes_zero()  # a shift shared by both variants at each seed cancels
    # unpaired, the seed-to-seed spread (0.1) would hide the same gap
    assert not (summarize([5.00, 4.90, 5.10]).hi < summarize([5.10, 5.02, 5.18]).lo)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12), st.floats(-50, 50))
def test_interval_contains_mean_and_shifts_with_the_data(values, shift):
    s = summarize(values)
    assert s.lo <= s.mean + 1e-9 and s.mean <= s.hi + 1e-9
    moved = summarize([v + shift for v in values])
    assert moved.mean == pytest.approx(s.mean + shift, abs=1e-6)
    assert moved.half_width == pytest.approx(s.half_width, rel=1e-6, abs=1e-6)


# ---- pairing ---------------------------------------------------------------------------------


def test_same_seed_gives_every_variant_the_same_batches(corpus, tmp_path):
    base = _base(corpus, tmp_path)
    for seed in (0, 1):
        cfgs = [v.config(base, seed, tmp_path) for v in VARIANTS]
        assert len({c.out for c in cfgs}) == len(VARIANTS)  # one directory per (variant, seed)
        batches = [[load_data(c).train_batch(step, 0, c.batch_size) for step in range(4)] for c in cfgs]
        for other in batches[1:]:
            assert all(torch.equal(a, b) for a, b in zip(batches[0], other))
    a = _base(corpus, tmp_path, seed=0)
    b = _base(corpus, tmp_path, seed=1)
    assert not torch.equal(load_data(a).train_batch(0, 0, 2), load_data(b).train_batch(0, 0, 2))


def test_training_runs_consume_paired_batches(corpus, tmp_path, monkeypatch):
    """Through the real trainer: record what every run reads."""
    seen: dict[tuple[int, int], list] = {}
    original = TrainData.train_batch

    def spy(self, step, micro, batch_size, **kw):
        batch = original(self, step, micro, batch_size, **kw)
        seen.setdefault((self.seed, step), []).append(batch)
        return batch

    monkeypatch.setattr(TrainData, "train_batch", spy)
    variants = VARIANTS
    results = run_study(_base(corpus, tmp_path, steps=3, eval_every=3), tmp_path / "cmp", [0, 1], variants,
                        progress=False, log=lambda _m: None)
    assert set(results) == {(v.name, s) for v in variants for s in (0, 1)}
    assert sorted(seen) == [(s, step) for s in (0, 1) for step in range(3)]
    for (seed, step), batches in seen.items():
        assert len(batches) == len(VARIANTS), (seed, step)
        assert all(torch.equal(batches[0], b) for b in batches[1:])
    assert not torch.equal(seen[(0, 0)][0], seen[(1, 0)][0])
    # the seed also changes the initialisation: the two seeds of one variant start from other weights
    assert results[("moge", 0)]["curve"][0]["ce"] != results[("moge", 1)]["curve"][0]["ce"]


# ---- skipping finished runs, resuming, refusing mixed settings ---------------------------------


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(corpus, tmp_path, monkeypatch):
    variants = select_variants(["moge", "dense"])
    base = _base(corpus, tmp_path)
    first = run_study(base, tmp_path / "cmp", [0], variants, progress=False, log=lambda _m: None)
    result_file = compare.run_dir(tmp_path / "cmp", "moge", 0) / "result.json"
    stamp = result_file.stat().st_mtime_ns

    # an interrupted run: the dense run loses its result and its last checkpoint is an earlier step
    dense_dir = compare.run_dir(tmp_path / "cmp", "dense", 0)
    (dense_dir / "result.json").unlink()
    trained = []
    real_fit = compare.Trainer.fit

    def counting_fit(self, progress=True):
        trained.append((self.cfg.model, self.step))
        return real_fit(self, progress)

    monkeypatch.setattr(compare.Trainer, "fit", counting_fit)
    again = run_study(base, tmp_path / "cmp", [0], variants, progress=False, log=lambda _m: None)
    assert trained == []  # the dense run was complete on disk: it is measured again, not trained
    assert again[("moge", 0)] == first[("moge", 0)] and result_file.stat().st_mtime_ns == stamp
    assert again[("dense", 0)]["val"] == pytest.approx(first[("dense", 0)]["val"])

    # a run stopped by a signal after step 2 of 6 (its checkpoint saved) resumes there
    import shutil

    shutil.rmtree(dense_dir)
    monkeypatch.setattr(compare.Trainer, "_stop_requested", lambda self: self.step == 2)
    with pytest.raises(KeyboardInterrupt):
        run_study(base, tmp_path / "cmp", [0], variants, progress=False, log=lambda _m: None)
    assert not (dense_dir / "result.json").exists()
    monkeypatch.setattr(compare.Trainer, "_stop_requested", lambda self: False)
    done = run_study(base, tmp_path / "cmp", [0], variants, progress=False, log=lambda _m: None)
    assert trained == [("dense-tiny", 0), ("dense-tiny", 2)]
    assert [row["step"] for row in done[("dense", 0)]["curve"]] == list(range(1, 7))
    # and it ends where the uninterrupted run ended (resume is exact)
    assert done[("dense", 0)]["val"] == pytest.approx(first[("dense", 0)]["val"], abs=1e-5)


def test_a_finished_run_with_other_settings_is_refused(corpus, tmp_path):
    variants = select_variants(["dense"])
    run_study(_base(corpus, tmp_path, steps=3), tmp_path / "cmp", [0], variants, progress=False, log=lambda _m: None)
    with pytest.raises(ConfigError, match="other settings"):
        run_study(_base(corpus, tmp_path, steps=3, lr=1e-3), tmp_path / "cmp", [0], variants, progress=False,
                  log=lambda _m: None)
    # settings that do not change what a run learns do not count
    run_study(_base(corpus, tmp_path, steps=3, threads=2, save_every=1), tmp_path / "cmp", [0], variants,
              progress=False, log=lambda _m: None)


def test_bad_study_input():
    with pytest.raises(ConfigError, match="variants"):
        select_variants(["moge", "mixtral"])
    with pytest.raises(ConfigError, match="jobs"):
        run_study(TrainConfig(), "unused", [0], jobs=0)


# ---- the report and the command ----------------------------------------------------------------


def _fake_result(name, seed, val_mean, steps=9):
    curve = [{"step": s, "ce": 6.0 - s * 0.1, **({"val": {"a": val_mean + 0.1 * (steps - s), "b": val_mean}}
                                                  if s % 3 == 0 else {})} for s in range(1, steps + 1)]
    return {"variant": name, "seed": seed, "label": name, "model": name, "val": {"a": val_mean, "b": val_mean},
            "val_mean": val_mean, "params": {"total": 2e6, "activated": 1e6}, "tokens_per_step": 32,
            "train_seconds": 10.0, "curve": curve}


def test_report_states_only_what_the_intervals_allow(tmp_path):
    variants = select_variants(["moge", "topk", "dense"])
    results = {}
    for s, shift in enumerate((0.0, 0.2, -0.1)):
        results[("moge", s)] = _fake_result("moge", s, 5.0 + shift)
        results[("topk", s)] = _fake_result("topk", s, 5.1 + shift + 0.01 * s)  # moge lower at every seed
        results[("dense", s)] = _fake_result("dense", s, 5.0 + shift + (0.05, -0.05, 0.0)[s])
    path = write_report(results, variants, [0, 1, 2], TrainConfig(steps=9, batch_size=2, seq_len=16),
                        tmp_path / "docs" / "compare.md", command="moge compare --seeds 3")
    md = path.read_text()
    assert "    moge compare --seeds 3" in md
    assert "| moge - topk |" in md and "moge lower" in md
    assert "moge - dense" in md and "interval includes 0" in md
    assert "at 96 tokens" in md and "at 288 tokens" in md  # the 1/3 point (step 3 of 9) and the end
    for png in ("compare-curves.png", "compare-paired.png", "compare-val_by_domain.png"):
        assert (tmp_path / "docs" / "img" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"(img/{png})" in md


def test_compare_command_end_to_end_with_two_jobs(corpus, tmp_path, capsys):
    out, report = tmp_path / "cmp", tmp_path / "docs" / "compare.md"
    argv = ["compare", "--data", str(corpus / "data"), "--out", str(out), "--seeds", "2", "--variants", "moge",
            "topk", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "1", "--eval-windows", "2",
            "--threads", "1", "--jobs", "2", "--report", str(report), "--throughput-rounds", "1", "--no-progress",
            "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {(r["variant"], r["seed"]) for r in printed["runs"]} == {(v, s) for v in ("moge", "topk") for s in (0, 1)}
    assert set(printed["throughput"]["tokens_per_s"]) == {"moge", "topk"}
    md = report.read_text()
    assert "--seeds 2 --variants moge topk --jobs 2" in md and "## Training throughput" in md
    assert "moge - topk" in md and "1.000" in md  # MoGE's device balance is exact
    assert (tmp_path / "docs" / "img" / "compare-balance.png").exists()
    stamp = (out / "throughput.json").stat().st_mtime_ns
    assert main(argv) == 0  # everything reused: nothing trained, the benchmark not repeated
    assert (out / "throughput.json").stat().st_mtime_ns == stamp
    assert json.loads(capsys.readouterr().out)["runs"] == printed["runs"]
