"""Data x expert parallel training on real gloo process groups: equal to single-process training,
checkpoints that load at another expert-parallel size, a real torchrun launch, and failures of a
peer that end in a clear error instead of a hang."""

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moge.checkpoint import load_pretrained
from moge.config import PRESETS
from moge.parallel.launch import spawn
from moge.train.trainer import TrainConfig, Trainer, load_data


def _cfg(corpus, out, **kw):
    base = dict(model=str(corpus / "tiny.json"), data=str(corpus / "data"), out=str(out), steps=3, batch_size=4,
                seq_len=16, warmup=1, lr=1e-2, eval_every=100, eval_windows=2, save_every=100, aux_scope="global",
                threads=1)
    return TrainConfig(**(base | kw))


def _weights(path):
    return {k: v.clone() for k, v in load_pretrained(path).state_dict().items()}


def _close(a, b):
    """Equal up to fp32 summation order, after AdamW. Adam divides by the gradient's own size, so an
    element whose gradient is about zero (the key bias's is exactly zero: softmax ignores a
    per-query constant) moves by rounding noise times up to lr; the slack is 2% of one lr=1e-2 step,
    where a wrong gradient moves elements by whole steps."""
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-4) for k in b)


def _train_worker(rank, world, cfg_dict, resume):
    cfg = TrainConfig(**cfg_dict)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    if resume:
        assert trainer.resume()
    summary = trainer.fit(progress=False)
    return {"step": summary["step"], "checkpoint": summary["checkpoint"]}


@pytest.mark.parametrize("model,extra", [("tiny.json", {}),
                                         ("tiny-topk.json", {"mtp_modules": 1, "mtp_loss_weight": 0.3})])
def test_data_x_expert_parallel_training_equals_single_process(corpus, tmp_path, model, extra):
    # top-K with an MTP module: its MoE layer is expert parallel too
    single = _cfg(corpus, tmp_path / "single", model=str(corpus / model), **extra)
    Trainer(single, load_data(single), log=lambda _m: None).fit(progress=False)
    ep = _cfg(corpus, tmp_path / "ep", model=str(corpus / model), expert_parallel=2, **extra)
    spawn(_train_worker, 2, dataclasses.asdict(ep), False)
    want = _weights(tmp_path / "single" / "checkpoints" / "step-000003")
    got = _weights(tmp_path / "ep" / "checkpoints" / "step-000003")
    assert _close(got, want)
    rows = [json.loads(line) for line in (tmp_path / "ep" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one log, written by rank 0
    for a, b in zip(rows, ref, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
        if extra:
            assert a["mtp"] == pytest.approx(b["mtp"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_checkpoint_saved_at_one_expert_parallel_size_resumes_at_others(corpus, tmp_path):
    import shutil

    # the uninterrupted run: 4 steps at EP=2 on 2 ranks, checkpoints at steps 2 and 4
    full = _cfg(corpus, tmp_path / "full", steps=4, save_every=2, expert_parallel=2)
    spawn(_train_worker, 2, dataclasses.asdict(full), False)
    want = _weights(tmp_path / "full" / "checkpoints" / "step-000004")
    # the same run as if it had stopped after step 2
    for name in ("half", "half1"):
        run = tmp_path / name
        shutil.copytree(tmp_path / "full", run)
        shutil.rmtree(run / "checkpoints" / "step-000004")
        (run / "checkpoints" / "latest").write_text("step-000002\n")
    # ... finished at EP=4 on 4 ranks, and in a single process: the optimizer state travels too
    four = dataclasses.replace(full, out=str(tmp_path / "half"), expert_parallel=4)
    spawn(_train_worker, 4, dataclasses.asdict(four), True)
    assert _close(_weights(tmp_path / "half" / "checkpoints" / "step-000004"), want)
    one = dataclasses.replace(full, out=str(tmp_path / "half1"), expert_parallel=1)
    trainer = Trainer(one, load_data(one), log=lambda _m: None)
    assert trainer.resume() and trainer.step == 2
    trainer.fit(progress=False)
    assert _close(_weights(tmp_path / "half1" / "checkpoints" / "step-000004"), want)
    rows = [json.loads(line) for line in (tmp_path / "half1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the log reads as one run


def test_expert_parallel_without_processes_is_an_error(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "x", expert_parallel=2)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        Trainer(cfg, load_data(cfg))


def test_torchrun_launch_end_to_end(corpus, tmp_path):
    """The README's command: torchrun starts 2 gloo ranks that train with experts split over them."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moge", "train", "--model", str(corpus / "tiny.json"), "--data", str(corpus / "data"),
           "--out", str(out), "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
           "--eval-windows", "2", "--expert-parallel", "2", "--threads", "1", "--no-progress", "--json",
           "--dist-timeout", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["step"] == 2
    assert (out / "checkpoints" / "step-000002" / "model.safetensors.index.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _failing_worker(rank, world, init_file, mode, out_file):
    import datetime

    import torch.distributed as dist

    from moge.errors import DistributedError
    from moge.nn.moe import MoGEBlock
    from moge.parallel.expert import shard_model
    from moge.parallel.launch import peer_failures_as_errors
    from moge.parallel.mesh import ExpertParallelMesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))
    mesh = ExpertParallelMesh.build(2, timeout_s=3)
    torch.manual_seed(0)
    block = shard_model(MoGEBlock(PRESETS["moge-tiny"].replace(hidden_size=16, num_experts=8,
                                                                 num_groups=4, top_k=4).moe()), mesh)
    x = torch.randn(4, 16)
    block(x)  # both ranks alive: works
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(60)  # hang
        return
    start = time.monotonic()
    try:
        with peer_failures_as_errors(3):
            block(x)
        result = "no error"
    except DistributedError as e:
        result = str(e)
    Path(out_file).write_text(json.dumps({"error": result, "seconds": time.monotonic() - start}))
    os._exit(0)


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_gives_a_clear_error_within_the_timeout(tmp_path, mode):
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "rank0.json"
    procs = [ctx.Process(target=_failing_worker, args=(r, 2, str(tmp_path / "init"), mode, str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(60)
    for p in procs:
        p.kill()
    report = json.loads(out.read_text())
    assert report["error"].startswith("rank 0: a collective failed")
    assert "3 s limit (--dist-timeout)" in report["error"]
    assert report["seconds"] < 3 + 10
