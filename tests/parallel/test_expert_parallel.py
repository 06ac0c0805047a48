"""Expert parallelism on real gloo process groups (2 and 4 processes) against the single-process model:
forward logits, gradients after reduction, uneven and empty splits, the MoGE path without a count
exchange, and placement / bad-input errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CFG, make_model

from moge.config import MoEConfig
from moge.degrees import check_expert_parallel
from moge.inference.generate import generate
from moge.nn.experts import SwiGLUExperts
from moge.parallel.dispatch import AllToAllDispatcher
from moge.parallel.expert import full_state_dict, is_expert_param, shard_model
from moge.parallel.launch import spawn
from moge.parallel.lockstep import all_ranks_done
from moge.parallel.mesh import ExpertParallelMesh
from moge.parallel.training import clip_grad_norm, reduce_gradients


def _model_worker(rank, world, ep, router, batch, seq):
    cfg = CFG.replace(router=router)
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (world * batch, seq + 1), generator=torch.Generator().manual_seed(7))
    # single-process reference on everybody's tokens: the objective is the mean over all tokens
    ref = copy.deepcopy(model)
    ref_logits = ref(ids[:, :-1]).logits
    F.cross_entropy(ref_logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e30)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    mesh = ExpertParallelMesh.build(ep)
    shard_model(model, mesh)
    mine = ids[rank * batch:(rank + 1) * batch]
    logits = model(mine[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, cfg.vocab_size), mine[:, 1:].reshape(-1)).backward()
    reduce_gradients(model, mesh)
    norm = clip_grad_norm(model.named_parameters(), 1e30, mesh)
    lo = mesh.expert_range(cfg.num_experts)
    grad_err = 0.0
    for n, p in model.named_parameters():
        want = ref_grads[n][lo.start:lo.stop] if is_expert_param(n) else ref_grads[n]
        grad_err = max(grad_err, float((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    full = full_state_dict(model, mesh)
    state_equal = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    counted = [layer.mlp.dispatcher.last_dispatch.counts_exchanged for layer in model.model.layers]
    return {"logit_err": float((logits - ref_logits[rank * batch:(rank + 1) * batch]).detach().abs().max()),
            "grad_err": grad_err, "norm_err": abs(float(norm) - float(ref_norm)) / float(ref_norm),
            "state_equal": state_equal, "counted": counted,
            "received": [layer.mlp.dispatcher.last_dispatch.received for layer in model.model.layers]}


@pytest.mark.parametrize("world,ep,router", [(2, 2, "grouped"), (2, 2, "topk"), (4, 4, "grouped"),
                                             (4, 2, "topk")])
def test_expert_parallel_model_equals_single_process(world, ep, router):
    batch, seq = 2, 6
    results = spawn(_model_worker, world, ep, router, batch, seq)
    for r in results:
        assert r["logit_err"] < 1e-5
        assert r["grad_err"] < 1e-5
        assert r["norm_err"] < 1e-6
        assert r["state_equal"]
        # MoGE never exchanges counts; every rank receives exactly K' x groups-per-rank rows per token
        # from each of the ep ranks: tokens x K rows, whatever the routing
        assert r["counted"] == [router != "grouped"] * CFG.num_layers
        if router == "grouped":
            assert r["received"] == [batch * seq * CFG.top_k] * CFG.num_layers


def _dispatch_worker(rank, world):
    """Top-K routing where every slot goes to rank 0's experts: rank 1 receives nothing, and a rank
    with no tokens at all still takes part."""
    torch.manual_seed(0)
    experts = SwiGLUExperts(4, 16, 8, backend="loop")
    T = 5 if rank == 0 else 0
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    experts_TK = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])[:T]
    weights_TK = torch.rand(T, 2, generator=torch.Generator().manual_seed(3))
    ref = experts(x, experts_TK, weights_TK)
    disp = AllToAllDispatcher(4, None, slots_per_rank=None)
    local = SwiGLUExperts(2, 16, 8, backend="loop")
    with torch.no_grad():
        local.gate_up_proj.copy_(experts.gate_up_proj[2 * rank:2 * rank + 2])
        local.down_proj.copy_(experts.down_proj[2 * rank:2 * rank + 2])
    d = disp.dispatch(x, experts_TK)
    out = local(d.x_RD, d.local_expert_R.unsqueeze(1), torch.ones(d.x_RD.shape[0], 1))
    y = disp.combine(out, d, weights_TK)
    y.sum().backward() if T else (out.sum() * 0 + y.sum()).backward()
    gx = x.grad.clone() if T else torch.zeros(0)
    x.grad = None
    if T:
        ref.sum().backward()
    try:
        ExpertParallelMesh.build(3)
        bad_world = ""
    except ValueError as e:
        bad_world = str(e)
    # MoGE with a different number of tokens on each rank (as in generation): the block learns the
    # counts from one all-gathered integer per rank
    from moge.nn.moe import MoGEBlock

    torch.manual_seed(1)
    full = MoGEBlock(MoEConfig(hidden_size=16, num_experts=8, top_k=4, num_groups=4, expert_intermediate_size=16))
    block = shard_model(copy.deepcopy(full), ExpertParallelMesh.build(2))
    xs = torch.randn(4 if rank == 0 else 3, 16, generator=torch.Generator().manual_seed(10 + rank))
    with torch.no_grad():
        uneven = float((block(xs) - full(xs)).abs().max())
    return {"err": float((y - ref).abs().max()) if T else 0.0, "recv": d.recv_splits, "send": d.send_splits,
            "grad_err": float((gx - x.grad).abs().max()) if T else 0.0, "bad_world": bad_world,
            "uneven_moge_err": uneven, "uneven_recv": block.dispatcher.last_dispatch.recv_splits}


def test_uneven_and_empty_splits():
    r0, r1 = spawn(_dispatch_worker, 2)
    assert r0["send"] == [10, 0] and r1["send"] == [0, 0]
    assert r0["recv"] == [10, 0] and r1["recv"] == [0, 0]
    assert r0["err"] < 1e-6 and r0["grad_err"] < 1e-6
    assert "expert_parallel=3 is invalid: must divide the world size 2" in r0["bad_world"]
    for r in (r0, r1):  # 4 and 3 tokens, K' = 1 in each of the 2 groups a rank hosts
        assert r["uneven_moge_err"] < 1e-6 and r["uneven_recv"] == [8, 6]


def test_placement_is_contiguous_groups():
    # the paper's 8 groups on 4 expert-parallel ranks: groups 0,1 on rank 0, 2,3 on rank 1, ...
    ranks = [ExpertParallelMesh(world=4, rank=r, ep=4, ep_group=None, replica_group=None) for r in range(4)]
    assert [list(m.expert_range(64)) for m in ranks] == [list(range(16 * r, 16 * r + 16)) for r in range(4)]
    assert [list(range(8 * g, 8 * g + 8)) for g in (2, 3)] == [list(ranks[1].expert_range(64))[:8],
                                                                 list(ranks[1].expert_range(64))[8:]]


def test_invalid_expert_parallel_sizes_are_rejected():
    cfg = MoEConfig(hidden_size=8, num_experts=16, top_k=4, num_groups=4, expert_intermediate_size=8)
    check_expert_parallel(cfg, 2)
    with pytest.raises(ValueError, match=r"expert_parallel=3 is invalid: must divide num_experts=16"):
        check_expert_parallel(cfg, 3)
    with pytest.raises(ValueError, match=r"expert_parallel=8 is invalid: must divide num_groups=4"):
        check_expert_parallel(cfg, 8)
    with pytest.raises(ValueError, match="positive integer"):
        check_expert_parallel(cfg, 0)
    topk = MoEConfig(hidden_size=8, num_experts=16, top_k=4, num_groups=4, expert_intermediate_size=8, router="topk")
    check_expert_parallel(topk, 8)  # top-K has no groups to keep whole


def test_mesh_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        ExpertParallelMesh.build(2)


def test_block_rejects_groups_split_across_ranks():
    block_cfg = CFG.replace(num_experts=8, num_groups=2, top_k=2).moe()
    from moge.nn.moe import MoGEBlock
    mesh = ExpertParallelMesh(world=4, rank=0, ep=4, ep_group=None, replica_group=None)
    with pytest.raises(ValueError, match="num_groups=2"):
        shard_model(MoGEBlock(block_cfg), mesh)


def _generate_worker(rank, world, router):
    cfg = CFG.replace(router=router)
    model = make_model(cfg).eval()
    prompts = torch.randint(0, cfg.vocab_size, (world * 2, 5), generator=torch.Generator().manual_seed(11)).tolist()
    want = generate(model, prompts, max_new_tokens=6, stop_ids=[]).tokens
    shard_model(model, ExpertParallelMesh.build(world))
    # each rank decodes its own two prompts; rank 1 stops early at its first generated token
    mine = prompts[2 * rank:2 * rank + 2]
    stop = [want[2][0]] if rank == 1 else []
    got = generate(model, mine, max_new_tokens=6, stop_ids=stop, all_done=all_ranks_done).tokens
    return {"got": got, "want": want[2 * rank:2 * rank + 2]}


@pytest.mark.parametrize("router", ["grouped", "topk"])
def test_expert_parallel_generation_matches_single_process(router):
    r0, r1 = spawn(_generate_worker, 2, router)
    assert r0["got"] == r0["want"]
    # rank 1's rows end at their first stop token, while it kept stepping with rank 0
    stop = r1["want"][0][0]
    assert r1["got"] == [w[:w.index(stop) + 1] if stop in w else w for w in r1["want"]]
    assert r1["got"][0] == [stop]
