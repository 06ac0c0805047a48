"""`torchrun -m moge generate` with the model split over 2 processes (expert parallel, and the H2P
layout) prints what a single process prints."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moge.checkpoint import save_pretrained
from moge.checkpoint.build import checkpoint_dtype
from moge.cli import main
from moge.errors import CheckpointError, ConfigError
from moge.nn.model import PanguProMoEForCausalLM
from moge.inference.speculative import speculative_generate
from moge.parallel import H2P, launch, parallelize
from moge.parallel.parallelize import offline_mesh
from models import echo_mtp_model, make_model, tiny_config

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


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """An MTP module that mostly echoes the trunk's own prediction (eh_proj close to [I, 0], small
    attention and MLP outputs, the trunk's final norm): this trunk repeats tokens, so drafts get
    accepted, and by the two rows in different numbers (masked holes in the caches)."""
    path = tmp_path_factory.mktemp("gen-mtp") / "ckpt"
    save_pretrained(echo_mtp_model(CFG.replace(num_mtp_modules=1)), path)
    return path


@pytest.mark.parametrize("parallel", [("--parallel", "ep"),
                                      ("--parallel", "h2p", "--attn-tp", "2", "--expert-tp", "1"),
                                      ("--parallel", "h2p", "--attn-tp", "1", "--expert-tp", "2")],
                         ids=["ep", "h2p-attn-tp2", "h2p-attn-dp2"])
def test_torchrun_speculative_matches_one_process(mtp_checkpoint, capsys, parallel):
    draft = ["--num-draft", "2"]
    assert main(["generate", "--model", str(mtp_checkpoint), *ARGS]) == 0
    want = [c["tokens"] for c in json.loads(capsys.readouterr().out)["completions"]]
    assert main(["generate", "--model", str(mtp_checkpoint), *ARGS, "--speculative", *draft]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert [c["tokens"] for c in alone["completions"]] == want
    got = _torchrun(mtp_checkpoint, *parallel, "--speculative", *draft)
    assert [c["tokens"] for c in got["completions"]] == want
    assert got["speculative"] == alone["speculative"]  # the same drafts, accepted alike, in as many passes
    assert alone["speculative"]["accepted"] > 0


def test_speculative_refuses_a_model_whose_mtp_module_is_whole_while_the_trunk_is_split():
    model = PanguProMoEForCausalLM(CFG.replace(num_mtp_modules=1))
    mtp, model.model.mtp = model.model.mtp, torch.nn.ModuleList()  # split only the trunk, as by hand
    parallelize(model, H2P(1, 2), offline_mesh(H2P(1, 2), 2, 0))
    model.model.mtp = mtp
    with pytest.raises(ConfigError, match="speculative decoding needs the MTP module split like the trunk"):
        speculative_generate(model, [[1, 2, 3]], max_new_tokens=2)


# ---- device and dtype: the default follows the checkpoint, bad choices are one-line errors ----------------

def test_config_json_names_the_dtype_the_weights_are_saved_in(tmp_path):
    model = make_model(CFG)
    save_pretrained(model, tmp_path / "fp32")
    save_pretrained(model, tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert checkpoint_dtype(tmp_path / "bf16") == torch.bfloat16
    assert "torch_dtype" not in CFG.to_hf_dict()  # a config without weights states no dtype


def _loaded_dtype(monkeypatch, checkpoint, *extra) -> torch.dtype:
    """Run `moge generate` and return the dtype its model was loaded in."""
    import moge.checkpoint as ckpt

    seen = []
    real = ckpt.load_pretrained

    def spy(*args, **kw):
        model = real(*args, **kw)
        seen.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(ckpt, "load_pretrained", spy)
    assert main(["generate", "--model", str(checkpoint), "--token-ids", "1,2", "--max-new-tokens", "2",
                 "--json", *extra]) == 0
    return seen[0]


def test_default_dtype_follows_the_checkpoint_and_dtype_overrides_it(tmp_path, monkeypatch, capsys):
    save_pretrained(make_model(CFG), tmp_path / "bf16", dtype="bf16")
    save_pretrained(make_model(CFG), tmp_path / "fp32")
    assert _loaded_dtype(monkeypatch, tmp_path / "bf16") == torch.bfloat16
    assert _loaded_dtype(monkeypatch, tmp_path / "fp32") == torch.float32
    assert _loaded_dtype(monkeypatch, tmp_path / "bf16", "--dtype", "float32") == torch.float32
    assert _loaded_dtype(monkeypatch, tmp_path / "fp32", "--dtype", "bfloat16", "--device", "cpu") == torch.bfloat16


@pytest.mark.parametrize("flags, warned", [(frozenset({"avx2", "fma"}), True),
                                           (frozenset({"avx2", "avx512f", "avx512_bf16"}), False),
                                           (frozenset({"avx2", "amx_bf16"}), False)])
def test_slow_bf16_warning_depends_on_the_cpu(tmp_path, monkeypatch, capsys, flags, warned):
    monkeypatch.setattr(launch, "cpu_flags", lambda: flags)
    save_pretrained(make_model(CFG), tmp_path / "bf16", dtype="bf16")
    _loaded_dtype(monkeypatch, tmp_path / "bf16")
    err = capsys.readouterr().err
    assert ("warning: bfloat16 on this CPU" in err) is warned, err
    capsys.readouterr()
    _loaded_dtype(monkeypatch, tmp_path / "bf16", "--dtype", "float32")  # float32 never warns
    assert "warning" not in capsys.readouterr().err


def test_slow_dtype_note_only_for_half_types_on_cpu(monkeypatch):
    monkeypatch.setattr(launch, "cpu_flags", lambda: frozenset({"avx2"}))
    assert launch.slow_dtype_note(torch.float32, torch.device("cpu")) is None
    assert "float16" in launch.slow_dtype_note(torch.float16, torch.device("cpu"))
    monkeypatch.setattr(launch, "cpu_flags", lambda: frozenset())  # unknown CPU: no guess
    assert launch.slow_dtype_note(torch.bfloat16, torch.device("cpu")) is None


@pytest.mark.parametrize("device, count, message", [
    ("cuda", 0, r"device='cuda' is invalid: this machine has no CUDA device .*valid: cpu"),
    ("cuda:7", 0, r"device='cuda:7' is invalid: this machine has no CUDA device"),
    ("cuda:7", 1, r"device='cuda:7' is invalid: there is no GPU 7; this machine has 1 CUDA device\(s\) "
                  r"\(valid: cpu, cuda:0\)"),
    ("tpu", 1, r"device='tpu' is invalid: choose one of auto, cpu, cuda, cuda:N"),
    ("gpu:0", 1, r"device='gpu:0' is invalid: choose one of auto, cpu, cuda, cuda:N"),
])
def test_a_device_that_does_not_exist_is_a_one_line_error(checkpoint, monkeypatch, capsys, device, count, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--device", device]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_device_resolution_follows_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.resolve_device("auto") == torch.device("cuda", 1)
    assert launch.resolve_device("cuda") == torch.device("cuda", 1)
    assert launch.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert launch.backend_for(launch.resolve_device("auto")) == "nccl"
    assert launch.backend_for(launch.resolve_device("cpu")) == "gloo"
    monkeypatch.setenv("LOCAL_RANK", "2")  # a third rank on a 2-GPU machine
    with pytest.raises(ConfigError, match="local rank 2 has no GPU of its own"):
        launch.resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.resolve_device("auto") == torch.device("cpu")


def test_a_dtype_the_device_cannot_run_is_an_error(monkeypatch):
    real_ones = torch.ones

    def no_half(*args, dtype=None, **kw):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real_ones(*args, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "ones", no_half)
    with pytest.raises(ConfigError, match=r"dtype=float16 is invalid on cpu: its kernels cannot run it "
                                          r"\(\"addmm_impl_cpu_\" not implemented for 'Half'\); use --dtype float32"):
        launch.check_dtype_on_device(torch.float16, torch.device("cpu"))
    launch.check_dtype_on_device(torch.float32, torch.device("cpu"))


def test_the_files_dtype_wins_over_a_config_that_misnames_it(tmp_path):
    """Checkpoints written before torch_dtype followed the weights say "bfloat16" over fp32 files."""
    save_pretrained(make_model(CFG), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == torch.float32


def test_a_checkpoint_with_an_unknown_torch_dtype_names_it(tmp_path):
    save_pretrained(make_model(CFG), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "float8_e4m3fn"}))
    with pytest.raises(CheckpointError, match=r"torch_dtype='float8_e4m3fn' is not a dtype this loader reads"):
        checkpoint_dtype(tmp_path)


def test_train_refuses_a_device_that_does_not_exist_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--model", "moge-tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                 "--device", "cuda:1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "device='cuda:1' is invalid: this machine has no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
