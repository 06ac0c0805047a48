"""The H2P hybrid layout (attention DP x TP, routed experts TP x EP, shared expert TP over all ranks,
embed_tokens and lm_head split by vocabulary rows over all ranks) on real gloo process groups equals
the single-process model, for prefill and cached decoding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CFG, make_model

from moge.checkpoint import save_pretrained
from memory import record_reads
from moge.degrees import check_hybrid
from moge.nn.model import KVCache
from moge.parallel import H2P, load_parallel, parallelize
from moge.parallel.launch import spawn
from moge.parallel.parallelize import VocabSlice, offline_mesh


def _hybrid_worker(rank, world, attn_tp, expert_tp, router, batch, prompt, steps, overrides=None):
    cfg = CFG.replace(router=router, **(overrides or {}))
    model = make_model(cfg).eval()
    dp = world // attn_tp
    ids = torch.randint(0, cfg.vocab_size, (dp * batch, prompt + steps), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # single process: prefill, then one token at a time with the KV cache
        cache = KVCache.allocate(cfg, dp * batch, prompt + steps, torch.float32)
        ref = [model(ids[:, :prompt], cache=cache).logits]
        ref += [model(ids[:, prompt + i:prompt + i + 1], cache=cache).logits for i in range(steps)]
        hybrid = parallelize(model, H2P(attn_tp, expert_tp))  # the same model, split in place
        d = rank // attn_tp
        mine = ids[d * batch:(d + 1) * batch]
        cache = hybrid.allocate_cache(batch, prompt + steps)
        got = [hybrid(mine[:, :prompt], cache=cache).logits]
        got += [hybrid(mine[:, prompt + i:prompt + i + 1], cache=cache).logits for i in range(steps)]
    return max(float((g - r[d * batch:(d + 1) * batch]).abs().max()) for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize("world,attn_tp,expert_tp,router", [
    (4, 2, 2, "grouped"),  # DP2 x TP2 attention, TP2 x EP2 experts, shared TP4 (the paper's 8-chip shape, halved)
    (2, 2, 1, "grouped"),  # one DP group, experts EP2
    (2, 1, 2, "topk"),     # attention DP2, experts TP2
])
def test_hybrid_layout_equals_single_process(world, attn_tp, expert_tp, router):
    # batch 1, prompt 3: 3 tokens per DP group, not a multiple of attn_tp (padding), then 1-token decode steps;
    # vocab_size 61 is divided by neither 2 nor 4 ranks (the last vocabulary block is short)
    errors = spawn(_hybrid_worker, world, attn_tp, expert_tp, router, 1, 3, 3)
    assert max(errors) < 1e-5


def _vocab_cases_worker(rank, world, cases):
    return [_hybrid_worker(rank, world, 2, 2, "grouped", 2, 3, 2, overrides) for overrides in cases]


def test_vocabulary_split_over_the_world_equals_single_process():
    cases = [dict(vocab_size=64, tie_word_embeddings=True),  # every rank 16 rows; one slice serves both
             dict(vocab_size=9)]  # blocks of 3 rows: 3, 3, 3 and none on the last rank
    for errors in spawn(_vocab_cases_worker, 4, cases):
        assert max(errors) < 1e-5


def _bf16_worker(rank, world, attn_tp, expert_tp):
    """A bf16 H2P model still returns fp32 logits for its DP group, over the whole vocabulary, from the
    bf16 weights (as the single-process model computes them: bf16 hidden states and weights, fp32 product)."""
    model = make_model(CFG).eval()
    whole = copy.deepcopy(model).to(torch.bfloat16)
    hybrid = parallelize(model, H2P(attn_tp, expert_tp)).to(torch.bfloat16)
    d = rank // attn_tp
    h = torch.randn(world // attn_tp, 2, 3, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, CFG.vocab_size, (world // attn_tp, 2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hybrid.lm_head(h[d].bfloat16())
        want = F.linear(h[d].bfloat16().float(), whole.lm_head.weight.float())
        out = hybrid(ids[d]).logits
        ref = whole(ids[d]).logits
    return {"head_dtype": str(logits.dtype), "head_error": float((logits - want).abs().max()),
            "dtype": str(out.dtype), "shape": tuple(out.shape), "error": float((out - ref).abs().max()),
            "scale": float(ref.abs().max())}


def test_bf16_model_keeps_fp32_logits_over_the_whole_vocabulary():
    for r in spawn(_bf16_worker, 2, 1, 2):  # attention DP2: each rank gets the other's logits too
        assert r["head_dtype"] == r["dtype"] == "torch.float32"
        assert r["shape"] == (2, 4, CFG.vocab_size)
        assert r["head_error"] < 1e-5
        assert r["error"] < 0.02 * r["scale"]  # bf16 partial sums meet in another order


def test_a_rank_reads_its_vocabulary_rows_only(tmp_path, monkeypatch):
    """Under H2P on 4 ranks each rank reads 1/4 of embed_tokens and of lm_head from the files (rows
    [16 r, 16 r + 16) of a 64-token vocabulary), and every row is read by exactly one rank."""
    cfg = CFG.replace(vocab_size=64)
    save_pretrained(make_model(cfg), tmp_path, max_shard_bytes=20_000)
    read = record_reads(monkeypatch)
    plan, whole = H2P(2, 2), cfg.vocab_size * cfg.hidden_size * 4
    for rank in range(4):
        read.clear()
        local = load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 4, rank))
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            (src,) = [s for k, s, _ in read if k == key]
            assert src[0] == slice(16 * rank, 16 * rank + 16)
            assert sum(b for k, _, b in read if k == key) == whole // 4
        assert local.lm_head.weight.shape == local.model.embed_tokens.weight.shape == (16, cfg.hidden_size)


def test_vocabulary_blocks_pad_logically():
    blocks = [VocabSlice(61, 4, r) for r in range(4)]
    assert [(b.start, b.stop, b.per) for b in blocks] == [(0, 16, 16), (16, 32, 16), (32, 48, 16), (48, 61, 16)]
    assert [(b.start, b.stop) for b in (VocabSlice(9, 4, r) for r in range(4))] == [(0, 3), (3, 6), (6, 9), (9, 9)]


def _mtp_worker(rank, world, attn_tp, expert_tp, batch, prompt, steps):
    """The MTP module under H2P: a prefill over the prompt's trunk hidden states, then cached steps
    (each on the trunk's next hidden state, the last one chained on the module's own output)."""
    cfg = CFG.replace(num_mtp_modules=1)
    model = make_model(cfg).eval()
    dp = world // attn_tp
    ids = torch.randint(0, cfg.vocab_size, (dp * batch, prompt + steps + 1),
                        generator=torch.Generator().manual_seed(4))

    def run(m, ids, trunk_cache, mtp_cache):
        out = m(ids[:, :prompt], cache=trunk_cache)
        mtp = m.mtp_forward(out.pre_norm_hidden, ids[:, 1:prompt + 1], cache=mtp_cache)
        seen = [out.pre_norm_hidden, mtp.logits, mtp.pre_norm_hidden]
        for i in range(steps):
            t = prompt + i
            out = m(ids[:, t:t + 1], cache=trunk_cache)
            hidden = out.pre_norm_hidden if i < steps - 1 else mtp.pre_norm_hidden[:, -1:]
            mtp = m.mtp_forward(hidden, ids[:, t + 1:t + 2], cache=mtp_cache, logits_slice=slice(-1, None))
            seen += [out.logits, mtp.logits, mtp.pre_norm_hidden]
        return seen

    def caches(m, rows):
        mtp_attn = m.model.mtp[0].self_attn.cfg.replace(num_layers=1)
        return m.allocate_cache(rows, prompt + steps), KVCache.allocate(mtp_attn, rows, prompt + steps, torch.float32)

    with torch.no_grad():
        ref = run(model, ids, *caches(model, dp * batch))
        hybrid = parallelize(model, H2P(attn_tp, expert_tp))
        d = rank // attn_tp
        got = run(hybrid, ids[d * batch:(d + 1) * batch], *caches(hybrid, batch))
    heads = hybrid.model.mtp[0].self_attn.cfg.num_heads
    experts = hybrid.model.mtp[0].mlp.experts.gate_up_proj.shape
    errors = [float((g - r[d * batch:(d + 1) * batch]).abs().max()) for g, r in zip(got, ref, strict=True)]
    return {"errors": errors, "shapes": [tuple(g.shape) for g in got], "heads": heads, "experts": tuple(experts)}


@pytest.mark.parametrize("attn_tp,expert_tp", [(2, 1), (1, 2)])
def test_mtp_module_under_hybrid_layout_equals_single_process(attn_tp, expert_tp):
    # batch 1, prompt 3 under attention TP2: padded token shards; under DP2 each rank its own rows
    results = spawn(_mtp_worker, 2, attn_tp, expert_tp, 1, 3, 2)
    f = CFG.expert_intermediate_size
    for r in results:
        assert max(r["errors"]) < 1e-5, r["errors"]
        assert r["shapes"][:3] == [(1, 3, CFG.hidden_size), (1, 3, CFG.vocab_size), (1, 3, CFG.hidden_size)]
        assert r["shapes"][3:6] == [(1, 1, CFG.vocab_size), (1, 1, CFG.vocab_size), (1, 1, CFG.hidden_size)]
        assert r["heads"] == CFG.num_heads // attn_tp  # the module is split, not replicated
        assert r["experts"] == (CFG.num_experts // (2 // expert_tp), 2 * f // expert_tp, CFG.hidden_size)


def test_a_rank_reads_its_share_of_the_mtp_module(tmp_path, monkeypatch):
    """Under H2P(2, 2) on 4 ranks each rank loads exactly the in-memory split of the MTP module and
    reads a quarter of its routed experts' bytes and half of its attention projections'."""
    cfg = CFG.replace(num_mtp_modules=1)
    whole = make_model(cfg)
    save_pretrained(whole, tmp_path, max_shard_bytes=20_000)
    read = record_reads(monkeypatch)
    plan = H2P(2, 2)
    sizes = {n: p.numel() * 4 for n, p in whole.named_parameters()}
    experts = sum(b for n, b in sizes.items() if n.startswith("model.mtp.0.mlp.experts."))
    q_proj = sizes["model.mtp.0.self_attn.q_proj.weight"]
    for rank in range(4):
        read.clear()
        got = load_parallel(tmp_path, plan, mesh=offline_mesh(plan, 4, rank))
        want = parallelize(copy.deepcopy(whole), plan, offline_mesh(plan, 4, rank))
        for name, t in want.state_dict().items():
            if name.startswith("model.mtp."):
                assert torch.equal(got.state_dict()[name], t), (rank, name)
        assert sum(b for k, _, b in read if k.startswith("model.mtp.0.mlp.experts.")) == experts // 4
        assert sum(b for k, _, b in read if k == "model.mtp.0.self_attn.q_proj.weight") == q_proj // 2


def test_hybrid_layout_rejects_impossible_shapes():
    with pytest.raises(ValueError, match=r"attn_tp=3 is invalid: must divide the world size 8"):
        check_hybrid(CFG, 8, 3, 2)
    with pytest.raises(ValueError, match=r"attn_tp=4 is invalid: must divide num_kv_heads=2"):
        check_hybrid(CFG, 8, 4, 2)
    with pytest.raises(ValueError, match=r"must divide num_groups=4"):
        check_hybrid(CFG, 8, 2, 1)
    with pytest.raises(ValueError, match=r"expert_tp=2 is invalid: must divide expert_intermediate_size=15"):
        check_hybrid(CFG.replace(expert_intermediate_size=15), 4, 2, 2)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=0"):
        check_hybrid(CFG.replace(shared_expert_intermediate_size=0), 4, 2, 2)
    check_hybrid(CFG.replace(num_heads=8, num_kv_heads=2, shared_expert_intermediate_size=32), 8, 2, 2)
