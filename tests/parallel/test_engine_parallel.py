"""The serving engine on a model split over 2 gloo processes: rank 0 schedules and broadcasts each
step, rank 1 follows; every request's tokens equal the single-process engine's, under expert
parallelism (MoGE and top-K routing) and under the H2P layout."""

from dataclasses import replace

import pytest
import torch
from models import make_model, tiny_config

from moge.inference.engine import Engine, EngineConfig, Request, follow
from moge.parallel import H2P, ExpertParallel, launch, parallelize

CFG = tiny_config(max_position_embeddings=64)
ENGINE = EngineConfig(kv_blocks=40, block_size=4, max_running=3, step_tokens=10)
LENGTHS, MAX_TOKENS = [5, 17, 3, 11, 8], [6, 4, 9, 5, 7]


def _requests():
    g = torch.Generator().manual_seed(3)
    return [Request(str(i), torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist(), m)
            for i, (n, m) in enumerate(zip(LENGTHS, MAX_TOKENS))]


def _serve(engine) -> dict[str, list[int]]:
    """Requests arrive over the first steps (two at once, then one per step) and join the batch."""
    pending, tokens, step = _requests(), {}, 0
    while pending or engine.has_work():
        for request in pending[:2 if step == 0 else 1]:
            engine.add(request)
        pending = pending[2 if step == 0 else 1:]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    return tokens


def _rank(rank, world, cfg, plan, config=ENGINE):
    model = parallelize(make_model(cfg), plan)
    if rank != 0:
        follow(model, config)
        return {}
    engine = Engine(model, config, distributed=True)
    try:
        return _serve(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("cfg, plan", [
    (CFG, ExpertParallel(2)),
    (CFG.replace(router="topk"), ExpertParallel(2)),
    (CFG, H2P(attn_tp=2, expert_tp=1)),
    (CFG, H2P(attn_tp=1, expert_tp=2)),
], ids=["ep-moge", "ep-topk", "h2p-attn-tp2", "h2p-expert-tp2"])
def test_ranks_in_lockstep_serve_what_one_process_serves(cfg, plan):
    want = _serve(Engine(make_model(cfg), ENGINE))
    assert sorted(want) == [str(i) for i in range(len(LENGTHS))]
    got = launch.spawn(_rank, 2, cfg, plan)
    assert got[0] == want and got[1] == {}


@pytest.mark.parametrize("plan", [ExpertParallel(2), H2P(attn_tp=2, expert_tp=1)], ids=["ep", "h2p"])
def test_speculative_decoding_in_lockstep_serves_what_one_process_serves(plan):
    """Each step is two broadcasts (the trunk's batch, then the MTP module's); every request's
    tokens equal the single-process engine's."""
    cfg = CFG.replace(num_mtp_modules=1)
    config = replace(ENGINE, speculative=True)
    want = _serve(Engine(make_model(cfg), config))
    got = launch.spawn(_rank, 2, cfg, plan, config)
    assert got[0] == want
