"""`moge simulate` and `moge search` through moge.cli.main."""

import json

import pytest

from moge.cli import main

PAPER = ["simulate", "--model", "pangu-pro-moe", "--hardware", "ascend-800i-a2", "--cards", "4", "--stage",
         "decode", "--batch", "456", "--input-len", "2048", "--quant", "w8a8"]


def assert_png_has_content(path, min_size=(300, 200)):
    """A real PNG of a sensible size with something drawn on it (not one flat colour)."""
    import matplotlib.image as mpimg
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.shape[1] >= min_size[0] and pixels.shape[0] >= min_size[1]
    rgb = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 10  # axes, text and data, not a blank canvas


def test_paper_command_json(capsys):
    assert main(PAPER + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ttft_ms", "tpot_ms", "throughput_tok_s_per_card", "memory_gb_per_card", "breakdown"):
        assert key in out
    assert abs(out["tpot_ms"] / 99.31 - 1) < 0.02
    assert abs(out["throughput_tok_s_per_card"] / 1148 - 1) < 0.02
    assert out["breakdown"]["routed_experts"] > 0
    assert abs(sum(out["breakdown"].values()) - out["step_ms"]) < 1e-6


def test_table_and_plot(capsys, tmp_path):
    png = tmp_path / "b.png"
    assert main(PAPER + ["--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "TPOT" in text and "routed_experts" in text
    assert_png_has_content(png)


def test_validate(capsys):
    """--validate reports, for each of the paper's three points, the paper's number, the model's
    prediction with the stored factors and their ratio; leave-one-out as stored by the calibration."""
    from moge.sim import calibration as cal

    assert main(["simulate", "--validate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["given"] for p in out["points"]] == [p.given for p in cal.POINTS]
    for row in out["points"]:
        assert row["rel_error"] == pytest.approx(row["predicted"] / row["given"] - 1)
        assert abs(row["rel_error"]) < 0.02
    assert out["leave_one_out"] == cal.stored_record()["leave_one_out"]
    assert main(["simulate", "--validate"]) == 0  # the table prints the same numbers
    text = capsys.readouterr().out
    for row in out["points"]:
        assert f"{row['given']:.2f}" in text and f"{row['predicted']:.2f}" in text


def test_plan_overrides_mtp_and_bound(capsys):
    assert main(["simulate", "--cards", "8", "--attn-tp", "2", "--attn-dp", "4", "--expert-tp", "1",
                 "--expert-ep", "8", "--mtp-acceptance", "0.8", "--tpot-bound-ms", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["attn_tp"] == 2 and out["plan"]["name"] == "custom"
    assert out["mtp"]["tokens_per_step"] == 1.8
    assert out["tpot_ms"] <= 50 and out["bounds"]["met"] is True and out["batch"] > 1


def test_errors_name_the_field(capsys):
    assert main(["simulate", "--cards", "3", "--attn-tp", "3", "--expert-ep", "3", "--dense-tp", "3"]) == 2
    assert "attn_tp=3" in capsys.readouterr().err
    assert main(["simulate", "--hardware", "nope"]) == 2
    assert "hardware='nope'" in capsys.readouterr().err
    assert main(["simulate", "--model", "qwen2.5-72b", "--hardware", "nvidia-h100", "--cards", "1",
                 "--quant", "bf16"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_sweep(capsys):
    assert main(["simulate", "--sweep-batch", "1,64,456", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["batch"] for r in rows] == [1, 64, 456]
    assert rows[0]["tpot_ms"] < rows[1]["tpot_ms"] < rows[2]["tpot_ms"]


def test_search_plan(capsys):
    assert main(["search", "--cards", "4", "--tpot-bound-ms", "100", "--plans", "h2p,tp,ep", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["best"]
    assert best["tpot_ms"] <= 100 and best["batch"] > 1
    tputs = [p["throughput_tok_s_per_card"] for p in out["plans"] if p["feasible"]]
    assert tputs == sorted(tputs, reverse=True)


def test_search_arch_small(capsys, tmp_path):
    png = tmp_path / "arch.png"
    assert main(["search", "--arch", "--grid", "small", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "Pangu Pro MoE ranks" in text
    assert_png_has_content(png)


def test_help_texts(capsys):
    for cmd in ("simulate", "search"):
        try:
            main([cmd, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert "--json" in capsys.readouterr().out


def test_uncertainty_and_feature_flags(capsys):
    assert main(PAPER + ["--json", "--uncertainty", "--samples", "6", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    u = out["uncertainty"]
    assert u["samples"] == 6
    for m in ("ttft_ms", "tpot_ms", "throughput_tok_s_per_card"):
        q = u["quantiles"][m]
        assert q["p10"] <= q["p50"] <= q["p90"]
        assert len(u["most_sensitive"][m]) == 3
    assert main(PAPER + ["--uncertainty", "--samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "p10" in text and "most sensitive" in text
    assert main(PAPER + ["--json", "--voted-experts", "5", "--overlap-comm", "--exec-mode", "eager",
                         "--mtp-accepted", "0.8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["voted_experts"] == 5 and out["overlap_comm"] and out["exec_mode"] == "eager"
    assert out["mtp"]["draft_tokens"] == 1 and out["mtp"]["tokens_per_step"] == pytest.approx(1.8)
    assert out["tpot_ms"] == pytest.approx(out["step_ms"] / 1.8)
    assert main(PAPER + ["--voted-experts", "0"]) == 2
    assert "voted_experts=0" in capsys.readouterr().err
