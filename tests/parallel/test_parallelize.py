"""`moge.parallel.parallelize`: plans applied to an unchanged model. One block forward and one model
forward on every layout, parameter names kept, degree rules from moge.degrees, the dispatchers'
invariants (H2P partial sums add up to the whole block), groups that keep the world's timeout, and
generate's lockstep hook."""

import copy

import pytest
import torch
from tiny_models import CFG, make_model

from moge.degrees import check_expert_parallel, check_hybrid
from moge.errors import ConfigError
from moge.inference.generate import generate
from moge.nn.model import PanguProMoEForCausalLM
from moge.nn.moe import LocalDispatcher, MoGEBlock
from moge.parallel import H2P, ExpertParallel, parallelize
from moge.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from moge.parallel.launch import spawn
from moge.parallel.lockstep import all_ranks_done
from moge.parallel.mesh import ExpertParallelMesh, H2PMesh


def _fake_h2p_mesh(world, rank, attn_tp):
    """The ranks' view of an H2P mesh without processes: enough to shard (no collective runs)."""
    return H2PMesh(world=world, rank=rank, attn_tp=attn_tp, attn_group=None)


def test_dispatcher_is_a_component_outside_the_state_dict():
    model = make_model()
    block = model.model.layers[0].mlp
    assert isinstance(block.dispatcher, LocalDispatcher)
    assert not any("dispatcher" in name for name in model.state_dict())
    assert all(m is not block.dispatcher for m in model.modules())


def test_bad_plans_are_rejected_with_the_degree_rules_messages():
    model = make_model()
    with pytest.raises(ConfigError) as got:
        parallelize(model, ExpertParallel(3))
    with pytest.raises(ConfigError) as want:
        check_expert_parallel(CFG, 3)
    assert str(got.value) == str(want.value) and "num_experts=8" in str(got.value)
    with pytest.raises(ConfigError, match="num_groups=4"):
        parallelize(model, ExpertParallel(8))
    for world, attn_tp, expert_tp, message in [(4, 3, 1, "attn_tp=3 is invalid: must divide the world size 4"),
                                               (4, 4, 1, "attn_tp=4 is invalid: must divide num_kv_heads=2"),
                                               (8, 2, 1, "must divide num_groups=4")]:
        with pytest.raises(ConfigError) as got:
            parallelize(model, H2P(attn_tp, expert_tp), _fake_h2p_mesh(world, 0, attn_tp))
        with pytest.raises(ConfigError) as want:
            check_hybrid(CFG, world, attn_tp, expert_tp)
        assert str(got.value) == str(want.value) and message in str(got.value)
    with pytest.raises(ConfigError, match="PanguProMoEForCausalLM"):
        parallelize(model.model.layers[0].mlp, H2P(1, 1), _fake_h2p_mesh(1, 0, 1))
    with pytest.raises(ConfigError, match="plan="):
        parallelize(model, "ep")
    # nothing was changed by the refused plans
    assert all(isinstance(m.dispatcher, LocalDispatcher) for m in model.modules() if isinstance(m, MoGEBlock))
    with pytest.raises(RuntimeError, match="torchrun"):  # valid plan, no process group to build it on
        parallelize(model, ExpertParallel(2))


def test_h2p_keeps_the_model_and_its_names_and_refuses_a_second_plan():
    whole = make_model()
    model = parallelize(copy.deepcopy(whole), H2P(2, 2), _fake_h2p_mesh(4, 3, 2))
    assert type(model) is PanguProMoEForCausalLM
    assert list(dict(model.named_parameters())) == list(dict(whole.named_parameters()))
    for layer in model.model.layers:
        assert type(layer.mlp) is MoGEBlock and isinstance(layer.mlp.dispatcher, AllGatherDispatcher)
        # rank 3 = expert EP rank 1 (experts 4..7), expert TP rank 1 (second half of F)
        f = CFG.expert_intermediate_size
        want = whole.model.layers[0].mlp.experts.down_proj[4:8, :, f // 2:] if layer is model.model.layers[0] else None
        if want is not None:
            torch.testing.assert_close(layer.mlp.experts.down_proj, want, rtol=0, atol=0)
        assert layer.self_attn.cfg.num_kv_heads == CFG.num_kv_heads // 2
    cache = model.allocate_cache(1, 8)
    assert cache.k.shape[2] == CFG.num_kv_heads // 2  # this rank's heads only
    with pytest.raises(ConfigError, match="already parallelized"):
        parallelize(model, H2P(2, 2), _fake_h2p_mesh(4, 3, 2))


@pytest.mark.parametrize("router", ["grouped", "topk"])
def test_h2p_partial_sums_over_the_ranks_are_the_whole_block(router):
    """What each rank adds before the reduce-scatter (its experts' F-slices, its slice of the shared
    expert) sums over the ranks to the single-process block, on every token."""
    cfg = CFG.replace(router=router)
    whole = make_model(cfg)
    x_TD = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    want = whole.model.layers[1].mlp(x_TD)
    total = torch.zeros_like(want)
    for rank in range(4):
        block = parallelize(copy.deepcopy(whole), H2P(1, 2), _fake_h2p_mesh(4, rank, 1)).model.layers[1].mlp
        routing = block.router(x_TD)
        total += block.dispatcher(x_TD, routing, block.experts) + sum(s(x_TD) for s in block._shared())
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)


def _layout_worker(rank, world):
    """Both plans on 2 ranks: the block and model forwards are the classes' own, names unchanged,
    and the groups keep the world's timeout (not torch's 30-minute default)."""
    whole = make_model()
    forwards, names = [], []
    ep = parallelize(copy.deepcopy(whole), ExpertParallel(2))
    h2p = parallelize(copy.deepcopy(whole), H2P(2, 1))
    for model in (ep, h2p):
        forwards.append(type(model).forward is PanguProMoEForCausalLM.forward
                        and all(type(layer.mlp).forward is MoGEBlock.forward for layer in model.model.layers))
        names.append(list(dict(model.named_parameters())) == list(dict(whole.named_parameters())))
    dispatchers = [type(m.model.layers[0].mlp.dispatcher).__name__ for m in (ep, h2p)]
    mesh = ExpertParallelMesh.build(2)
    timeouts = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for g in (mesh.ep_group, mesh.replica_group, H2PMesh.build(2).attn_group)]
    return {"forwards": forwards, "names": names, "dispatchers": dispatchers, "timeouts": timeouts}


def test_one_forward_and_the_worlds_timeout_on_every_layout():
    for r in spawn(_layout_worker, 2, timeout_s=97.0):
        assert r["forwards"] == [True, True] and r["names"] == [True, True]
        assert r["dispatchers"] == [AllToAllDispatcher.__name__, AllGatherDispatcher.__name__]
        assert r["timeouts"] == [97.0, 97.0, 97.0]


def test_generate_steps_until_the_lockstep_hook_says_every_rank_is_done():
    model = make_model().eval()
    prompts = [[1, 2, 3], [4, 5]]
    first = [row[0] for row in generate(model, prompts, max_new_tokens=4, stop_ids=[]).tokens]
    alone = generate(model, prompts, max_new_tokens=4, stop_ids=first)  # both rows stop at once
    assert alone.tokens == [[first[0]], [first[1]]] and alone.decode_steps == 0
    calls = []

    def another_rank_still_busy(done: bool) -> bool:  # ... for two more steps
        calls.append(done)
        return done and len(calls) == 3

    lockstep = generate(model, prompts, max_new_tokens=4, stop_ids=first, all_done=another_rank_still_busy)
    assert lockstep.tokens == alone.tokens  # the extra steps' tokens are discarded
    assert lockstep.decode_steps == 2 and calls == [True] * 3
    assert all_ranks_done(True) and not all_ranks_done(False)  # no process group: this process decides
