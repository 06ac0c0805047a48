"""The `moge` command: help on every subcommand, JSON output, clear errors, a real subprocess run."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from moge.cli import build_parser, main
from moge.config import PRESETS, load_model_config


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    """--help exits 0 and documents the subcommand: its usage line, a description, and every option
    the parser accepts with a help text of its own."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: moge {name}")
    assert sub.description or sub.format_usage() != text, f"moge {name} has no description"
    for action in sub._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        for option in action.option_strings:
            assert option in text, f"moge {name} --help does not mention {option}"
        assert action.help, f"moge {name}: {action.option_strings or action.dest} has no help text"


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


def test_a_bad_config_value_is_one_line_and_exit_code_2(tmp_path, capsys):
    bad = PRESETS["moge-tiny"].to_hf_dict() | {"num_key_value_heads": 3}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    assert main(["simulate", "--model", str(tmp_path / "config.json"), "--cards", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "moge simulate: error: num_kv_heads=3 is invalid: must divide num_heads=4 (valid: [1, 2, 4])\n"


def test_a_missing_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["data", "info", "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moge data: error: ") and err.count("\n") == 1 and "nowhere" in err


def test_an_internal_error_shows_its_traceback(monkeypatch):
    import moge.commands.imbalance as cmd

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(cmd, "run", bug)
    with pytest.raises(KeyError, match="internal"):  # not swallowed into one line
        main(["imbalance", "--trials", "10"])
    code = ("import sys, moge.commands.imbalance as cmd\n"
            "def bug(args): raise KeyError('internal')\n"
            "cmd.run = bug\n"
            "from moge.cli import main\n"
            "sys.exit(main(['imbalance', '--trials', '10']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'internal'" in proc.stderr


@pytest.mark.parametrize("command", ["quantize", "analyze"])
def test_corpus_of_another_tokenizer_is_refused_by_quantize_and_analyze(command, corpus, tmp_path, capsys):
    from moge.checkpoint import save_pretrained
    from moge.nn.model import PanguProMoEForCausalLM

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    save_pretrained(PanguProMoEForCausalLM(load_model_config(corpus / "tiny.json")), ckpt)
    (ckpt / "tokenizer.model").write_bytes(b"\x0a\x05other")  # a SentencePiece tokenizer, not the corpus's
    args = {"quantize": ["quantize", "--model", str(ckpt), "--out", str(tmp_path / "q"), "--calib-windows", "2",
                         "--seq-len", "16", "--pool", "4"],
            "analyze": ["analyze", "--ckpt", str(ckpt), "--seq-len", "16", "--windows", "2"]}[command]
    assert main([*args, "--data", str(corpus / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moge {command}: error: the corpus at ") and str(ckpt / "tokenizer.model") in err
    assert str(corpus / "data" / "tokenizer.json") in err and not (tmp_path / "q").exists()
