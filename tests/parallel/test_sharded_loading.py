"""Sharded loading: every rank reads only what it hosts, straight from the safetensors shards.

In one process (offline meshes, no process group) the loaded share of every rank equals the
whole model parallelized in memory, bit for bit, under EP and H2P, across files, dtypes and tied
embeddings; unsupported checkpoints are refused. On 2 real gloo ranks, each rank's peak RSS stays
well under what one process needs for the whole model, and the logits equal the single-process
model's."""

import copy

import pytest
import torch
from memory import record_reads, reset_peak, rss_kib
from models import make_model, smallest_config, tiny_config

from moge.checkpoint import CheckpointError, load_pretrained, save_pretrained, save_quantized
from moge.checkpoint.partial import GlobalSlice
from moge.parallel import H2P, ExpertParallel, load_parallel, parallelize
from moge.parallel.launch import spawn
from moge.parallel.parallelize import offline_mesh
from moge.quant.model import quantize_model

CFG = tiny_config(vocab_size=61)
PLANS = [(ExpertParallel(2), 2), (ExpertParallel(4), 4), (H2P(2, 1), 2), (H2P(2, 2), 4), (H2P(1, 2), 4)]


def _saved(tmp_path, cfg=CFG, dtype=torch.float32, max_shard_bytes=20_000):
    model = make_model(cfg).to(dtype)
    save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    return model


@pytest.mark.parametrize("plan,world", PLANS, ids=[f"{p}-w{w}" for p, w in PLANS])
def test_every_rank_loads_exactly_its_share(tmp_path, plan, world):
    whole = _saved(tmp_path)
    for rank in range(world):
        want = parallelize(copy.deepcopy(whole), plan, offline_mesh(plan, world, rank))
        got = load_parallel(tmp_path, plan, mesh=offline_mesh(plan, world, rank))
        got_state, want_state = got.state_dict(), want.state_dict()
        assert list(got_state) == list(want_state)
        for name, t in want_state.items():
            assert torch.equal(got_state[name], t), (rank, name)
        assert got.global_slices == want.global_slices
        assert not any(t.is_meta for t in [*got.parameters(), *got.buffers()])


def test_records_name_the_global_pieces():
    """gate_up under expert TP is two row ranges (gate's and up's) of one expert range."""
    model = make_model(CFG)
    plan = H2P(2, 2)
    local = parallelize(model, plan, offline_mesh(plan, 4, 3))  # expert EP rank 1, TP rank 1
    f = CFG.expert_intermediate_size
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert local.global_slices[key] == GlobalSlice(key, ((slice(4, 8), slice(f // 2, f)),
                                                         (slice(4, 8), slice(f + f // 2, 2 * f))), dim=1)
    bias = "model.layers.0.self_attn.o_proj.bias"
    assert local.global_slices[bias] == GlobalSlice(bias, ())  # attention TP rank 1: zeros


def test_dtype_follows_the_files_unless_asked_and_ties_stay_tied(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=True)
    whole = _saved(tmp_path, cfg, dtype=torch.bfloat16)
    plan = ExpertParallel(2)
    got = load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 2, 1))
    assert got.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert got.lm_head.weight is got.model.embed_tokens.weight
    torch.testing.assert_close(got.model.layers[1].mlp.experts.down_proj,
                               whole.model.layers[1].mlp.experts.down_proj[4:], rtol=0, atol=0)
    as_fp32 = load_parallel(tmp_path, plan, dtype="fp32", mesh=offline_mesh(plan, 2, 0))
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())


def test_a_rank_reads_only_its_experts(tmp_path, monkeypatch):
    """Count the bytes each read returns: rank 1 of EP=4 reads a quarter of the expert bytes."""
    whole = _saved(tmp_path)
    read = record_reads(monkeypatch)
    plan = ExpertParallel(4)
    load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 4, 1))
    expert_bytes = sum(b for k, _, b in read if ".mlp.experts." in k)
    total_experts = sum(p.numel() * 4 for n, p in whole.named_parameters() if ".mlp.experts." in n)
    assert expert_bytes == total_experts // 4
    assert {k.split(".experts.")[1].split(".")[0] for k, _, _ in read if ".mlp.experts." in k} == {"2", "3"}


def test_pickle_checkpoints_are_refused_and_quantized_ones_load(tmp_path):
    model = make_model(CFG)
    save_pretrained(model, tmp_path / "float")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "float" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    plan = ExpertParallel(2)
    with pytest.raises(CheckpointError, match="safetensors files only"):
        load_parallel(pickled, plan, mesh=offline_mesh(plan, 2, 0))
    quantized = copy.deepcopy(model)
    quantize_model(quantized)
    save_quantized(quantized, tmp_path / "w8a8")
    # W8A8 is read in slices too (bit-exactness: tests/quant/test_quant_parallel.py)
    got = load_parallel(tmp_path / "w8a8", plan, mesh=offline_mesh(plan, 2, 0))
    assert got.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.int8


# ---- memory on real ranks --------------------------------------------------------------------------

# experts are ~95% of the bytes: 3 layers x 8 experts x 3 x 256 x 1024 fp32 = 75 MB of 80 MB
BIG = tiny_config(vocab_size=256, hidden_size=256, num_heads=4, num_kv_heads=2, num_experts=8, num_groups=4,
                  top_k=4, expert_intermediate_size=1024, shared_expert_intermediate_size=128, num_layers=3)


def _memory_worker(rank, world, directory, plan):
    ids = torch.randint(0, BIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    # The runtime baseline: torch imported, the process group up, and what torch loads once whatever
    # the model's size: its meta-device kernels (~70 MB; both loaders build on meta) and the CPU
    # kernels' first-call state (~10 MB), warmed by one forward of a 4-expert model.
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    with torch.no_grad():
        warm = make_model(smallest_config())
        warm(ids[:, :4] % warm.config.vocab_size)
    del warm
    reset_peak()
    baseline = rss_kib("VmRSS")
    with torch.no_grad():
        if plan is None:
            model = load_pretrained(directory).eval()
        else:
            model = load_parallel(directory, plan).eval()
        logits = model(ids).logits
    return {"peak_above_baseline": (rss_kib("VmHWM") - baseline) * 1024, "logits": logits}


@pytest.mark.parametrize("plan", [ExpertParallel(2), H2P(2, 1)], ids=["ep2", "h2p-tp2-ep2"])
def test_each_rank_peaks_well_under_one_whole_model(tmp_path, plan, monkeypatch):
    _saved(tmp_path, BIG, max_shard_bytes=8 << 20)
    # a fixed glibc mmap threshold, inherited by the spawned processes: the default one rises after a
    # large free and then keeps freed tens-of-MB blocks on the heap, which at this size is noise of
    # the same order as the effect measured (see test_train_parallel's fresh-start test)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    (single,) = spawn(_memory_worker, 1, str(tmp_path), None)
    ranks = spawn(_memory_worker, 2, str(tmp_path), plan)
    whole = single["peak_above_baseline"]
    for r in ranks:
        assert r["peak_above_baseline"] <= 0.65 * whole, (r["peak_above_baseline"], whole)
        torch.testing.assert_close(r["logits"], single["logits"], rtol=0, atol=1e-5)
