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
from memory import reset_peak, rss_kib

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


def _expert_parallel_save_worker(rank, world, cfg_dict):
    """Train, save at the last step, and report what this rank holds and which files it wrote, with
    whether every tensor it wrote was a view of its own parameters (nothing gathered or copied)."""
    import moge.checkpoint.save as save_module
    from moge.train.checkpointing import optimizer_state_by_name

    cfg = TrainConfig(**cfg_dict)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    own = {t.untyped_storage().data_ptr() for t in trainer.model.state_dict().values()}
    written, real = [], save_module.write_safetensors

    def spy(path, tensors, target=None):
        tensors = list(tensors)
        written.append({"file": Path(path).name, "keys": [k for k, _ in tensors],
                        "views": all(t.untyped_storage().data_ptr() in own for _, t in tensors)})
        return real(path, tensors, target)

    save_module.write_safetensors = spy
    trainer.fit(progress=False)
    return {"weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": optimizer_state_by_name(trainer.optimizer, trainer.model)["state"], "written": written}


def _resume_worker(rank, world, cfg_dict, ids):
    """Resume the latest checkpoint; report this rank's weights and optimizer state, untouched, and
    the resumed model's logits for `ids`."""
    from moge.train.checkpointing import optimizer_state_by_name

    cfg = TrainConfig(**cfg_dict)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    assert trainer.resume()
    result = {"weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
              "optimizer": optimizer_state_by_name(trainer.optimizer, trainer.model)["state"]}
    with torch.no_grad():
        return result | {"logits": trainer.model.eval()(ids).logits}


def _whole(per_rank, name, key=None):
    """Parameter `name` (or its optimizer state `key`) as one process holds it, from every EP rank's:
    experts concatenated in rank order, anything else replicated bit for bit."""
    from moge.parallel.expert import is_expert_param

    tensors = [r[name] if key is None else r[name][key] for r in per_rank]
    if is_expert_param(name) and tensors[0].dim():
        return torch.cat(tensors)
    assert all(torch.equal(t, tensors[0]) for t in tensors), (name, key)
    return tensors[0]


def test_expert_parallel_checkpoint_is_written_by_every_rank_and_loads_anywhere(corpus, tmp_path):
    """EP=2 training saves one released-layout checkpoint without gathering: each rank writes the
    shards of its own experts from views of its parameters, rank 0 the rest. The files hold exactly
    what the ranks hold (bit for bit: weights and optimizer state), which equals single-process
    training up to summation order; it resumes at EP=4 and in one process, and loads in one process,
    at EP=4 and through transformers with the same logits."""
    from moge.train.checkpointing import read_optimizer_state

    extra = {"mtp_modules": 1, "mtp_loss_weight": 0.3}  # the MTP module's experts are sharded too
    ep = _cfg(corpus, tmp_path / "ep", expert_parallel=2, **extra)
    ranks = spawn(_expert_parallel_save_worker, 2, dataclasses.asdict(ep))
    path = tmp_path / "ep" / "checkpoints" / "step-000003"
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step-000003"]  # no staging left

    # who wrote what: disjoint released-layout shards, every tensor a view of the writer's parameters
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    by_rank = [{w["file"]: w["keys"] for w in r["written"]} for r in ranks]
    assert all(w["views"] for r in ranks for w in r["written"])
    assert sorted([*by_rank[0], *by_rank[1]]) == files
    assert {k: f for rank in by_rank for f, keys in rank.items() for k in keys} == index
    experts = [{int(k.split(".experts.")[1].split(".")[0]) for f in rank.values() for k in f if ".experts." in k}
               for rank in by_rank]
    assert experts == [set(range(0, 4)), set(range(4, 8))]  # 8 experts: rank r writes its own 4
    assert all(".experts." in k for keys in by_rank[1].values() for k in keys)

    # the files hold exactly what the ranks hold
    saved = load_pretrained(path).state_dict()
    held = [r["weights"] for r in ranks]
    assert saved.keys() == held[0].keys()
    assert all(torch.equal(saved[k], _whole(held, k)) for k in saved)
    trainer_pt = torch.load(path / "trainer.pt", weights_only=True)
    assert trainer_pt["optimizer_by_name"]["expert_parts"]["files"] == [
        "optimizer-experts-00001-of-00002.pt", "optimizer-experts-00002-of-00002.pt"]
    optimizer = read_optimizer_state(path, trainer_pt["optimizer_by_name"])["state"]
    held_opt = [r["optimizer"] for r in ranks]
    assert optimizer.keys() == held_opt[0].keys()
    for name, entry in optimizer.items():
        assert entry.keys() == held_opt[0][name].keys()
        assert all(torch.equal(value, _whole(held_opt, name, key)) for key, value in entry.items()), name

    # ... and equal single-process training up to fp32 summation order (not bit-exact: the data-
    # parallel gradient average sums in another order)
    single = _cfg(corpus, tmp_path / "single", **extra)
    Trainer(single, load_data(single), log=lambda _m: None).fit(progress=False)
    assert _close(saved, _weights(tmp_path / "single" / "checkpoints" / "step-000003"))

    # resumes at EP=4 (each rank reads only its rows of the optimizer parts) and in one process
    ids = torch.tensor([[5, 17, 33, 8, 91, 44, 12, 60], [70, 3, 29, 51, 7, 7, 1, 2]])
    four = dataclasses.replace(ep, expert_parallel=4)
    resumed = spawn(_resume_worker, 4, dataclasses.asdict(four), ids)
    for name in saved:
        assert torch.equal(_whole([r["weights"] for r in resumed], name), saved[name]), name
    for name, entry in optimizer.items():
        assert all(torch.equal(_whole([r["optimizer"] for r in resumed], name, key), value)
                   for key, value in entry.items()), name
    one = _resume_worker(0, 1, dataclasses.asdict(dataclasses.replace(ep, expert_parallel=1)), ids)
    assert all(torch.equal(one["weights"][k], saved[k]) for k in saved)
    assert all(torch.equal(one["optimizer"][n][k], v) for n, e in optimizer.items() for k, v in e.items()
               if torch.is_tensor(v))

    # the same logits in one process (load_pretrained, and resumed), at EP=4 and through transformers
    with torch.no_grad():
        want = load_pretrained(path).eval()(ids).logits
    torch.testing.assert_close(one["logits"], want, rtol=0, atol=0)
    for r in resumed:
        torch.testing.assert_close(r["logits"], want, rtol=1e-5, atol=1e-5)  # EP sums in another order
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits
    torch.testing.assert_close(hf, want, rtol=0, atol=0)


def _failing_save_worker(rank, world, cfg_dict):
    """Train 2 steps saving after each; rank 1 fails to write its shard of step 2 (a full disk)."""
    import moge.checkpoint.save as save_module
    from moge.train.config import TrainingError

    cfg = TrainConfig(**cfg_dict)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    real = save_module.write_safetensors

    def disk_full(path, tensors, target=None):
        if rank == 1 and trainer.step == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, tensors, target)

    save_module.write_safetensors = disk_full
    try:
        trainer.fit(progress=False)
    except TrainingError as e:
        return {"error": str(e), "step": trainer.step}
    return {"error": None, "step": trainer.step}


def test_a_rank_failing_during_the_save_fails_every_rank_and_commits_nothing(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", steps=2, save_every=1, expert_parallel=2)
    results = spawn(_failing_save_worker, 2, dataclasses.asdict(cfg))
    for r in results:  # every rank raises the same error, naming the rank and its cause
        assert r["step"] == 2
        assert r["error"].startswith("saving the checkpoint of step 2 failed while writing (rank 1: OSError: ")
        assert "No space left on device" in r["error"] and "nothing was committed" in r["error"]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # staging removed
    assert (root / "latest").read_text() == "step-000001\n"
    resumed = Trainer(dataclasses.replace(cfg, expert_parallel=1), load_data(cfg), log=lambda _m: None)
    assert resumed.resume() and resumed.step == 1  # the previous checkpoint is whole


def _dying_save_worker(rank, world, init_file, cfg_dict, out_file):
    """Like `_failing_save_worker`, but rank 1 dies outright in the middle of writing step 2."""
    import datetime

    import moge.checkpoint.save as save_module
    import torch.distributed as dist

    from moge.errors import DistributedError
    from moge.parallel.launch import peer_failures_as_errors

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=5))
    cfg = TrainConfig(**cfg_dict)
    trainer = Trainer(cfg, load_data(cfg), log=lambda _m: None)
    real = save_module.write_safetensors

    def die(path, tensors, target=None):
        if rank == 1 and trainer.step == 2:
            os._exit(3)
        return real(path, tensors, target)

    save_module.write_safetensors = die
    start = time.monotonic()
    try:
        with peer_failures_as_errors(5):
            trainer.fit(progress=False)
        result = "no error"
    except DistributedError as e:
        result = str(e)
    Path(out_file).write_text(json.dumps({"error": result, "seconds": time.monotonic() - start}))
    os._exit(0)


def test_a_rank_dying_during_the_save_is_a_clear_error_and_commits_nothing(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", steps=2, save_every=1, expert_parallel=2)
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "rank0.json"
    procs = [ctx.Process(target=_dying_save_worker,
                         args=(r, 2, str(tmp_path / "init"), dataclasses.asdict(cfg), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(120)
    for p in procs:
        p.kill()
    report = json.loads(out.read_text())
    assert report["error"].startswith("rank 0: a collective failed"), report
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-000001\n"
    assert not (root / "step-000002").exists()  # the half-written staging directory was never committed
    resumed = Trainer(dataclasses.replace(cfg, expert_parallel=1), load_data(cfg), log=lambda _m: None)
    assert resumed.resume() and resumed.step == 1


# ---- a fresh start never makes the whole model ---------------------------------------------------

def _fresh_start_worker(rank, world, cfg_dict):
    """Peak RSS above the runtime baseline while the Trainer builds and initialises this rank's model,
    and this rank's initial expert tensors of layer 0."""
    from models import smallest_config

    from moge.train.model import build_model

    cfg = TrainConfig(**cfg_dict)
    data = load_data(cfg)
    # the baseline: torch, the process group, the corpus, and the kernels' first-call state (meta and
    # CPU), warmed by building a 4-expert model the same way
    build_model(smallest_config(), TrainConfig())
    reset_peak()  # the peak (VmHWM) restarts from the current RSS
    baseline = rss_kib("VmRSS")
    trainer = Trainer(cfg, data, log=lambda _m: None)
    peak = (rss_kib("VmHWM") - baseline) * 1024
    experts = trainer.model.model.layers[0].mlp.experts
    return {"peak_above_baseline": peak, "gate_up": experts.gate_up_proj.detach().clone(),
            "down": experts.down_proj.detach().clone(),
            "q": trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone()}


def test_fresh_expert_parallel_start_makes_only_its_share(corpus, tmp_path, monkeypatch):
    """Each EP=2 rank initialises only its experts (bit for bit the single process's rows) and peaks at
    well under what one process needs for the whole model. Experts are ~97% of this model's ~310 MB
    (big enough that the process groups' own ~4 MB, made after the baseline, stay small beside it)."""
    model = tmp_path / "experts-heavy.json"
    from models import tiny_config

    tiny_config(vocab_size=300, hidden_size=256, num_heads=4, num_kv_heads=2, num_experts=8, num_groups=4,
                top_k=4, expert_intermediate_size=3072, shared_expert_intermediate_size=128,
                num_layers=4).to_json(model)
    one = _cfg(corpus, tmp_path / "one", model=str(model))
    # glibc raises its mmap threshold (up to 32 MB) after freeing a large block, and then keeps freed
    # tens-of-MB blocks on the heap: at this model's size that alone moved one rank from 0.52x to
    # 0.66x in some runs. A fixed threshold, inherited by the spawned processes, measures the model.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    (single,) = spawn(_fresh_start_worker, 1, dataclasses.asdict(one))
    ranks = spawn(_fresh_start_worker, 2, dataclasses.asdict(dataclasses.replace(one, expert_parallel=2)))
    for key in ("gate_up", "down"):
        assert torch.equal(torch.cat([r[key] for r in ranks]), single[key])
    assert all(torch.equal(r["q"], single["q"]) for r in ranks)
    whole = single["peak_above_baseline"]
    assert whole > 280e6  # the whole model (~310 MB fp32) was measured
    for r in ranks:
        assert r["peak_above_baseline"] <= 0.65 * whole, (r["peak_above_baseline"], whole)
