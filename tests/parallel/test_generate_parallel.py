"""`torchrun -m moge generate` with the model split over 2 processes (expert parallel, and the H2P
layout) prints what a single process prints."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moge.checkpoint import save_pretrained
from moge.cli import main
from moge.nn.model import PanguProMoEForCausalLM
from models import tiny_config

CFG = tiny_config(vocab_size=61, eos_token_id=60)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    torch.manual_seed(0)
    save_pretrained(PanguProMoEForCausalLM(CFG).init_weights(0.2, seed=0), path)
    return path


ARGS = ["--token-ids", "1,2,3,4", "--token-ids", "5,6,7,8", "--max-new-tokens", "6", "--json"]


def _torchrun(checkpoint, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moge",
           "generate", "--model", str(checkpoint), *ARGS, "--dist-timeout", "60", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_torchrun_generate_expert_parallel_and_h2p_match_one_process(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), *ARGS]) == 0
    want = [c["tokens"] for c in json.loads(capsys.readouterr().out)["completions"]]
    assert len(want) == 2 and all(want)
    for extra in (("--parallel", "ep"), ("--parallel", "h2p", "--attn-tp", "2", "--expert-tp", "1")):
        got = _torchrun(checkpoint, *extra)
        assert [c["tokens"] for c in got["completions"]] == want, extra


def test_speculative_is_refused_under_torchrun(checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group starts
    monkeypatch.setenv("RANK", "0")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--speculative"]) == 2
    assert "--speculative runs in a single process" in capsys.readouterr().err
