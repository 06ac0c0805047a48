"""`moge simulate` and `moge search` through moge.cli.main."""

import json

from moge.cli import main

PAPER = ["simulate", "--model", "pangu-pro-moe", "--hardware", "ascend-800i-a2", "--cards", "4", "--stage",
         "decode", "--batch", "456", "--input-len", "2048", "--quant", "w8a8"]


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
    assert png.stat().st_size > 1000


def test_validate(capsys):
    assert main(["simulate", "--validate"]) == 0
    text = capsys.readouterr().out
    assert "424.21" in text and "18.44" in text and "99.31" in text and "leave-one-out" in text


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
    assert png.stat().st_size > 1000


def test_help_texts(capsys):
    for cmd in ("simulate", "search"):
        try:
            main([cmd, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert "--json" in capsys.readouterr().out
