"""A W8A8 checkpoint under expert parallelism and the H2P layout, on 2 gloo ranks, gives the logits of
the single-process W8A8 model.

Tolerance: EP moves whole token rows, so every per-token activation scale is the single-process one
and the integer sums are exact: only float summation order differs (max |diff| < 1e-4). H2P splits
o_proj and the shared expert's down_proj by input features, and each rank quantizes its slice of the
activation with its own per-token scale (the weights and their per-row scales are exactly the
single-process ones). That is a different int8 rounding of the same activations, of the same size
as W8A8's own error: we require the H2P error to stay below the error W8A8 itself makes against
the float model (measured on this model: 0.0073 vs 0.0124, i.e. 0.58x) and below 0.05 in absolute
terms, and the greedy next tokens to agree.

Sharded loading: `load_parallel` on a W8A8 checkpoint gives every rank, bit for bit and dtype for
dtype, the state of `parallelize(load_quantized(dir), plan)`, reading only its share of the expert
bytes (int8 weights and their scales); `moge generate` under torchrun loads W8A8 that way too.
"""

import argparse
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moge.checkpoint import CheckpointError
from moge.checkpoint.partial import GlobalSlice, PartialSource
from moge.checkpoint.quantized import load_quantized, save_quantized
from moge.nn.model import KVCache
from moge.parallel import H2P, ExpertParallel, load_parallel, parallelize
from moge.parallel.launch import spawn
from moge.parallel.parallelize import offline_mesh
from moge.quant import QuantExperts, QuantLinear, quantize_model
from models import make_model, tiny_config

CFG = tiny_config(vocab_size=61)
PROMPT, STEPS = 5, 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    model = make_model(CFG)
    from moge.checkpoint import save_pretrained

    save_pretrained(model, root / "float")
    quantize_model(model)
    save_quantized(model, root / "w8a8")
    return root


def _logits(model, ids, cache):
    """Prefill, then one token at a time with the KV cache: every step's logits."""
    out = [model(ids[:, :PROMPT], cache=cache).logits]
    out += [model(ids[:, PROMPT + i:PROMPT + i + 1], cache=cache).logits for i in range(STEPS)]
    return torch.cat(out, dim=1)


def _worker(rank, world, root, plan):
    from moge.checkpoint import load_pretrained

    ids = torch.randint(0, CFG.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_float = _logits(load_pretrained(f"{root}/float").eval(), ids,
                            KVCache.allocate(CFG, 2, PROMPT + STEPS, torch.float32))
        model = load_quantized(f"{root}/w8a8").eval()
        ref = _logits(model, ids, KVCache.allocate(CFG, 2, PROMPT + STEPS, torch.float32))
        split = parallelize(model, plan)
        quantized = sum(isinstance(m, (QuantLinear, QuantExperts)) for m in split.modules())
        allocate = getattr(split, "allocate_cache", None)
        cache = allocate(2, PROMPT + STEPS) if allocate is not None else \
            KVCache.allocate(CFG, 2, PROMPT + STEPS, torch.float32)
        got = _logits(split, ids, cache)
    return {"err": float((got - ref).abs().max()), "w8a8_err": float((ref - ref_float).abs().max()),
            "same_argmax": bool((got.argmax(-1) == ref.argmax(-1)).all()), "quantized_modules": quantized}


def test_w8a8_expert_parallel_matches_one_process(checkpoints):
    results = spawn(_worker, 2, str(checkpoints), ExpertParallel(2))
    for r in results:
        assert r["quantized_modules"] > 0
        assert r["err"] < 1e-4, r
        assert r["same_argmax"]


def test_w8a8_h2p_matches_one_process_within_the_activation_rounding(checkpoints):
    results = spawn(_worker, 2, str(checkpoints), H2P(2, 1))
    for r in results:
        assert r["quantized_modules"] > 0
        assert r["w8a8_err"] > 0  # the reference really is quantized
        assert r["err"] < r["w8a8_err"] and r["err"] < 0.05, r
        assert r["same_argmax"]


# ---- sharded loading -------------------------------------------------------------------------------

PLANS = [(ExpertParallel(2), 2), (ExpertParallel(4), 4), (H2P(2, 1), 2), (H2P(2, 2), 4), (H2P(1, 2), 4)]


def _assert_same_state(got, want, where):
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state), where
    for name, t in want_state.items():
        assert got_state[name].dtype == t.dtype, (where, name, got_state[name].dtype, t.dtype)
        assert torch.equal(got_state[name], t), (where, name)
    assert got.global_slices == want.global_slices, where


@pytest.mark.parametrize("plan,world", PLANS, ids=[f"{p}-w{w}" for p, w in PLANS])
def test_every_rank_loads_exactly_its_w8a8_share(checkpoints, plan, world):
    """In one process (offline meshes): every rank of every plan, in the files' dtype and in bf16
    (int8 weights, scales and biases keep theirs; only the float tensors convert)."""
    whole = load_quantized(checkpoints / "w8a8")
    whole_bf16 = load_quantized(checkpoints / "w8a8", dtype="bf16")
    for rank in range(world):
        mesh = offline_mesh(plan, world, rank)
        want = parallelize(copy.deepcopy(whole), plan, mesh)
        got = load_parallel(checkpoints / "w8a8", plan, mesh=offline_mesh(plan, world, rank))
        _assert_same_state(got, want, (rank, "files"))
        assert sum(isinstance(m, (QuantLinear, QuantExperts)) for m in got.modules()) > 0
        assert not any(t.is_meta for t in [*got.parameters(), *got.buffers()])
        want = parallelize(copy.deepcopy(whole_bf16), plan, offline_mesh(plan, world, rank))
        got = load_parallel(checkpoints / "w8a8", plan, dtype="bf16", mesh=offline_mesh(plan, world, rank))
        _assert_same_state(got, want, (rank, "bf16"))
        assert got.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.int8
        assert got.model.layers[0].mlp.experts.down_scale.dtype == torch.float32
        assert got.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
        assert got.model.embed_tokens.weight.dtype == torch.bfloat16


def test_scale_records_follow_their_weights_rows():
    """Every int8 weight's scale record selects exactly the scales of the output rows its weight
    record selects: a row (output) slice takes the same rows of the scale, a column (input) slice
    keeps the whole scale. Checked on every record H2P(2, 2) makes on rank 3, semantically (applied
    to numbered tensors of the global shapes)."""
    model = make_model(CFG)
    quantize_model(model)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    plan = H2P(2, 2)
    local = parallelize(model, plan, offline_mesh(plan, 4, 3))
    state, records = local.state_dict(), local.global_slices
    pairs = [(n, n + "_scale") for n in records if n.endswith(".weight") and n + "_scale" in records]
    pairs += [(n, n.removesuffix("proj") + "scale") for n in records if n.endswith(("gate_up_proj", "down_proj"))
              and n.removesuffix("proj") + "scale" in records]
    assert len(pairs) == CFG.num_layers * (4 + 3 + 2)  # q k v o, the shared expert's 3, the routed 2
    whole_scale_kept = 0
    for weight, scale in pairs:
        w, s = records[weight], records[scale]
        assert s.key == (w.key + "_scale" if w.key.endswith(".weight") else w.key.removesuffix("proj") + "scale")
        numbered_w = torch.arange(shapes[w.key].numel()).reshape(shapes[w.key])
        numbered_s = torch.arange(shapes[s.key].numel()).reshape(shapes[s.key])
        rows_of_w = GlobalSlice(s.key, tuple(tuple(p[:numbered_s.dim()]) for p in w.pieces), w.dim)
        assert torch.equal(s.take(numbered_s), rows_of_w.take(numbered_s)), (weight, w, s)
        assert w.take(numbered_w).shape == state[weight].shape
        assert s.take(numbered_s).shape == state[scale].shape == state[weight].shape[:numbered_s.dim()]
        whole_scale_kept += s.take(numbered_s).shape[-1] == numbered_s.shape[-1]
    # o_proj and the shared expert's down_proj (column slices) keep every row's scale
    assert whole_scale_kept >= 2 * CFG.num_layers


def test_tied_w8a8_checkpoint_loads_tied(tmp_path):
    model = make_model(CFG.replace(tie_word_embeddings=True))
    quantize_model(model)
    save_quantized(model, tmp_path)
    plan = H2P(2, 1)
    got = load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 2, 1))
    assert got.lm_head.weight is got.model.embed_tokens.weight
    _assert_same_state(got, parallelize(load_quantized(tmp_path), plan, offline_mesh(plan, 2, 1)), "tied")


def test_a_bad_scale_in_a_rank_share_is_refused_naming_it(checkpoints, tmp_path):
    """The values a rank reads are checked like the whole loader checks them."""
    for name in ("config.json",):
        (tmp_path / name).write_text((checkpoints / "w8a8" / name).read_text())
    tensors = load_file(checkpoints / "w8a8" / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_scale"
    tensors[key][-1, 0] = 0.0  # the last expert: hosted by EP rank 1 only
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    plan = ExpertParallel(2)
    load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 2, 0))  # rank 0 never reads it
    with pytest.raises(CheckpointError, match=f"{key} holds the scale 0.0"):
        load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 2, 1))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]


def _expert_bytes(directory) -> dict[str, int]:
    tensors = load_file(directory / "model.safetensors")
    return {k: t.numel() * t.element_size() for k, t in tensors.items() if ".mlp.experts." in k}


def _sharded_worker(rank, world, root, parallel):
    """Split the whole W8A8 model in memory; then, with the whole-file reader disabled, load this
    rank's share through `moge generate`'s loader (load_parallel), counting the bytes read. Return
    the states' differences, both logits and the reads."""
    import moge.checkpoint.quantized as quantized
    from moge.commands.model import _load

    ids = torch.randint(0, CFG.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(model=f"{root}/w8a8", device="cpu", dtype=None, attn_tp=2, expert_tp=1)
    with torch.no_grad():
        want = parallelize(load_quantized(args.model), ExpertParallel(2) if parallel == "ep" else H2P(2, 1)).eval()

        def whole_read(*_args, **_kwargs):
            raise AssertionError("the W8A8 checkpoint was read whole")

        quantized.read_safetensors = whole_read
        read = []
        real = PartialSource._read_file

        def counting(self, path, reads):
            read.extend((key, [(s.start, s.stop) for s in src], dst.numel() * dst.element_size())
                        for key, src, dst in reads)
            return real(self, path, reads)

        PartialSource._read_file = counting
        got = _load(args, parallel)
        got_state, want_state = got.state_dict(), want.state_dict()
        differ = [n for n, t in want_state.items()
                  if n not in got_state or got_state[n].dtype != t.dtype or not torch.equal(got_state[n], t)]
        caches = [m.allocate_cache(2, PROMPT + STEPS) if hasattr(m, "allocate_cache") else
                  KVCache.allocate(CFG, 2, PROMPT + STEPS, torch.float32) for m in (got, want)]
        logits = [_logits(m, ids, c) for m, c in zip((got, want), caches, strict=True)]
    return {"differ": differ, "same_keys": list(got_state) == list(want_state),
            "same_records": got.global_slices == want.global_slices, "logits_got": logits[0],
            "logits_want": logits[1], "read": [[k, str(ix), b] for k, ix, b in read]}


@pytest.mark.parametrize("parallel", ["ep", "h2p"], ids=["ep2", "h2p-tp2-ep2"])
def test_w8a8_loaded_per_rank_equals_the_whole_model_split(checkpoints, parallel):
    """2 gloo ranks, `moge generate --parallel ep|h2p`'s loader: bit-exact state and logits of the
    whole model split in memory, without reading the file whole, and each rank reads exactly half
    of the expert bytes (int8 weights and scales), from its own experts' rows."""
    results = spawn(_sharded_worker, 2, str(checkpoints), parallel)
    experts = _expert_bytes(checkpoints / "w8a8")
    half = CFG.num_experts // 2
    for rank, r in enumerate(results):
        assert r["same_keys"] and r["same_records"] and r["differ"] == [], r["differ"]
        assert torch.equal(r["logits_got"], r["logits_want"])
        expert_reads = [(k, ix, b) for k, ix, b in r["read"] if ".mlp.experts." in k]
        assert sum(b for _, _, b in expert_reads) == sum(experts.values()) // 2
        assert {k for k, _, _ in expert_reads} == set(experts)  # weights and scales alike
        assert all(ix.startswith(f"[({rank * half}, {(rank + 1) * half})") for _, ix, _ in expert_reads)


def test_the_file_is_reopened_every_few_megabytes_and_reads_the_same(checkpoints, monkeypatch):
    """Pages read through one mapping stay resident until it closes: with a 1-byte budget every
    read gets its own mapping, and the share read is the same."""
    import moge.checkpoint.partial as partial

    plan = H2P(2, 1)
    want = load_parallel(checkpoints / "w8a8", plan, mesh=offline_mesh(plan, 2, 1))
    opened = []
    real = partial.safe_open
    monkeypatch.setattr(partial, "safe_open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(partial, "MAPPED_BYTES", 1)
    got = load_parallel(checkpoints / "w8a8", plan, mesh=offline_mesh(plan, 2, 1))
    _assert_same_state(got, want, "1-byte mappings")
    assert not CFG.tie_word_embeddings and len(opened) == sum(1 for rec in got.global_slices.values() if rec.pieces)
