"""The `moge` command: help on every subcommand, JSON output, clear errors, a real subprocess run."""

import json
import subprocess
import sys

import pytest

from moge.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_imbalance_json(capsys):
    assert main(["imbalance", "--trials", "500", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["experts"] == 64 and out["config"]["tokens"] == 16
    assert out["topk"]["p_is_positive"] > 0.95 and out["moge"]["p_is_positive"] == 0.0
    assert sum(out["topk"]["histogram"]["counts"]) == 500
    assert {"p50", "p95", "p99"} <= set(out["topk"]["percentiles"])


def test_imbalance_table_sweep_and_plot(tmp_path, capsys, monkeypatch):
    import moge.commands.imbalance as cmd

    monkeypatch.setattr(cmd, "SWEEP_TOKENS", [1, 64])
    png = tmp_path / "imb.png"
    assert main(["imbalance", "--trials", "300", "--experts", "16", "--top-k", "4", "--groups", "4",
                 "--sweep", "--plot", str(png), "--zipf", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "P(IS>0)" in text and "Batch-size sweep" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--groups", "7"], "--groups=7 is invalid: must divide --experts=64"),
    (["--top-k", "12"], "--top-k=12 is invalid"),
    (["--tokens", "0"], "--tokens=0 is invalid"),
    (["--zipf", "-1"], "--zipf=-1.0 is invalid"),
])
def test_imbalance_bad_input(args, message, capsys):
    assert main(["imbalance", "--trials", "10", *args]) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_runs_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "moge", "imbalance", "--trials", "200", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["moge"]["max"] == 0.0
