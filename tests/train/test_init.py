"""Initialisation from a seed without the whole model: every parameter and every routed expert has its
own generator, so a rank of a parallel run makes exactly its share of the single-process values, bit
for bit, from a model built on the meta device."""

import pytest
import torch
from models import tiny_config

from moge.nn.model import PanguProMoEForCausalLM
from moge.parallel import H2P, ExpertParallel, parallelize
from moge.parallel.expert import is_expert_param
from moge.parallel.parallelize import offline_mesh
from moge.train.config import TrainConfig
from moge.train.model import build_model

CFG = tiny_config()
TRAIN = TrainConfig(seed=3, init_std=0.05, mtp_modules=1, bias_update_rate=0.01)


def _single() -> dict[str, torch.Tensor]:
    return build_model(CFG, TRAIN).state_dict()


def test_one_init_function_for_the_whole_model_and_the_meta_path():
    whole = PanguProMoEForCausalLM(CFG.replace(num_mtp_modules=1)).init_weights(TRAIN.init_std, seed=TRAIN.seed)
    built = _single()
    params = dict(whole.named_parameters())
    assert all(torch.equal(built[k], v) for k, v in params.items())
    # every parameter is initialised (no meta or uninitialised memory left) and values differ per expert
    experts = built["model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts[0], experts[1])
    assert built["model.layers.0.mlp.router.expert_bias"].eq(0).all()  # the aux-loss-free router's buffer
    # the trunk does not depend on whether the run adds an MTP module
    plain = PanguProMoEForCausalLM(CFG).init_weights(TRAIN.init_std, seed=TRAIN.seed).state_dict()
    assert all(torch.equal(plain[k], built[k]) for k in plain)
    # and the seed matters
    other = PanguProMoEForCausalLM(CFG).init_weights(TRAIN.init_std, seed=4).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[q], plain[q])


@pytest.mark.parametrize("ep,world", [(2, 2), (4, 4), (2, 4)])
def test_each_expert_parallel_rank_makes_exactly_its_slice(ep, world):
    single = _single()
    plan = ExpertParallel(ep, same_tokens_per_rank=True)
    for rank in range(world):
        local = build_model(CFG, TRAIN, lambda m, r=rank: parallelize(m, plan, offline_mesh(plan, world, r)))
        state = local.state_dict()
        assert state.keys() == single.keys()
        for name, value in state.items():
            want = single[name]
            if is_expert_param(name):
                n = want.shape[0] // ep
                want = want[(rank % ep) * n:(rank % ep + 1) * n]
                assert value.shape[0] == n
            assert torch.equal(value, want), (rank, name)  # bit for bit


def test_tensor_parallel_slices_too():
    """H2P splits heads, expert widths and the shared expert: each piece is the same values as well."""
    single = PanguProMoEForCausalLM(CFG).init_weights(TRAIN.init_std, seed=TRAIN.seed)
    plan = H2P(2, 2)
    train = TrainConfig(seed=TRAIN.seed, init_std=TRAIN.init_std)
    for rank in range(4):
        mesh = offline_mesh(plan, 4, rank)
        local = build_model(CFG, train, lambda m, mesh=mesh: parallelize(m, plan, mesh))
        for name, value in local.state_dict().items():
            record = local.global_slices[name]
            assert torch.equal(value, record.take(single.state_dict()[record.key])), (rank, name)


def test_an_expert_range_is_never_made_from_the_whole_stack(monkeypatch):
    """A rank with 2 of 8 experts generates 2 expert blocks per stacked tensor, not 8."""
    import moge.nn.model as nn_model

    made: list[tuple] = []
    real = torch.randn

    def counting_randn(*shape, generator=None, **kw):
        made.append(tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | torch.Size) else shape)
        return real(*shape, generator=generator, **kw)

    monkeypatch.setattr(nn_model.torch, "randn", counting_randn)
    cfg = tiny_config(expert_intermediate_size=10)  # expert blocks [20, 32] and [32, 10]: no other matrix's shape
    plan = ExpertParallel(4)
    build_model(cfg, TrainConfig(), lambda m: parallelize(m, plan, offline_mesh(plan, 4, 1)))
    expert_blocks = [s for s in made if s in ((20, 32), (32, 10))]
    assert len(expert_blocks) == cfg.num_layers * 2 * (cfg.num_experts // 4)
    assert not any(len(s) == 3 for s in made)  # never a stack
