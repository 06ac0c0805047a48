"""The H2P hybrid layout (attention DP x TP, routed experts TP x EP, shared expert TP over all ranks) on
real gloo process groups equals the single-process model, for prefill and cached decoding."""

import pytest
import torch
from tiny_models import CFG, make_model

from moge.degrees import check_hybrid
from moge.nn.model import KVCache
from moge.parallel import H2P, parallelize
from moge.parallel.launch import spawn


def _hybrid_worker(rank, world, attn_tp, expert_tp, router, batch, prompt, steps):
    cfg = CFG.replace(router=router)
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
    # batch 1, prompt 3: 3 tokens per DP group, not a multiple of attn_tp (padding), then 1-token decode steps
    errors = spawn(_hybrid_worker, world, attn_tp, expert_tp, router, 1, 3, 3)
    assert max(errors) < 1e-5


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
