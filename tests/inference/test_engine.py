"""The serving engine (moge.inference.engine): continuous batching over the paged KV cache gives
each request exactly what generating it alone gives, whatever joins or leaves the batch, and
keeps its promises on memory, queueing, cancellation and failures."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import echo_mtp_model, make_model, tiny_config

from moge.errors import ConfigError
from moge.inference.engine import Engine, EngineConfig, QueueFull, Request
from moge.inference.generate import Sampling, generate
from moge.inference.speculative import speculative_generate

CFG = tiny_config(max_position_embeddings=96)


@pytest.fixture(scope="module")
def model():
    return make_model(CFG)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, max_tokens, sampling=Sampling(), stop=()):
    return generate(model, [prompt], max_new_tokens=max_tokens, sampling=sampling, stop_ids=list(stop)).tokens[0]


def _drain(engine, schedule=None):
    """Step until idle; `schedule` maps a step number to requests added before it. Returns tokens and
    finish reasons by request id, and the number of steps."""
    schedule = dict(schedule or {})
    tokens, reasons, step = {}, {}, 0
    while engine.has_work() or schedule:
        for request in schedule.pop(step, []):
            engine.add(request)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        step += 1
        used = engine.stats().kv_blocks_used
        assert 0 <= used <= engine.config.kv_blocks
    return tokens, reasons, step


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       arrivals=st.lists(st.integers(0, 6), min_size=6, max_size=6),
       max_tokens=st.lists(st.integers(1, 10), min_size=6, max_size=6),
       block_size=st.sampled_from([1, 3, 8]), step_tokens=st.integers(1, 24), max_running=st.integers(1, 4))
def test_every_request_equals_generating_it_alone_whatever_the_batch(model, lengths, arrivals, max_tokens, block_size,
                                                                    step_tokens, max_running):
    prompts = _prompts(lengths, seed=len(lengths))
    engine = Engine(model, EngineConfig(kv_blocks=64, block_size=block_size, max_running=max_running,
                                        step_tokens=step_tokens, max_waiting=16))
    schedule = {}
    for i, p in enumerate(prompts):
        schedule.setdefault(arrivals[i], []).append(Request(str(i), p, max_tokens[i]))
    tokens, reasons, _ = _drain(engine, schedule)
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == _alone(model, p, max_tokens[i]), i
        assert reasons[str(i)] == "length"
    assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_draws_what_generate_draws(model):
    prompt = _prompts([11])[0]
    sampling = Sampling(temperature=0.9, top_k=30, top_p=0.9, seed=5)
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    others = [Request(f"o{i}", p, 6, Sampling(1.0, seed=i)) for i, p in enumerate(_prompts([3, 9], seed=1))]
    tokens, _, _ = _drain(engine, {0: [Request("s", prompt, 12, sampling), *others]})
    assert tokens["s"] == _alone(model, prompt, 12, sampling)


def test_a_stop_id_ends_the_request_and_is_reported(model):
    prompt = _prompts([7])[0]
    free = _alone(model, prompt, 8)
    stop = free[3]
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    tokens, reasons, _ = _drain(engine, {0: [Request("a", prompt, 8, stop_ids=frozenset([stop]))]})
    assert tokens["a"] == free[:free.index(stop) + 1] and reasons["a"] == "stop"


def test_chunked_prefill_never_stalls_running_decodes(model):
    """A 60-token prompt arriving while two requests decode is prefilled in chunks of the step
    budget; the decodes get one token at every one of those steps."""
    short = _prompts([4, 5])
    engine = Engine(model, EngineConfig(kv_blocks=64, block_size=4, step_tokens=8))
    for i, p in enumerate(short):
        engine.add(Request(str(i), p, 20))
    engine.step()  # both prompts prefilled, first tokens out
    engine.add(Request("long", _prompts([60], seed=3)[0], 4))
    for _ in range(10):  # 60 prompt tokens at 8 - 2 per step: 10 steps of prefill
        outs = {o.request_id: o for o in engine.step()}
        assert set(outs) >= {"0", "1"} and all(len(outs[r].token_ids) == 1 for r in ("0", "1"))
    assert "long" in outs  # its first token comes with the last chunk


def test_admission_waits_for_kv_blocks_and_the_cache_never_overflows(model):
    """Each request needs ceil((8 + 8) / 4) = 4 blocks; 10 blocks admit two at a time."""
    prompts = _prompts([8] * 5)
    engine = Engine(model, EngineConfig(kv_blocks=10, block_size=4, max_running=8, max_waiting=8))
    for i, p in enumerate(prompts):
        engine.add(Request(str(i), p, 8))
    first = {o.request_id: o.token_ids for o in engine.step()}
    assert set(first) == {"0", "1"}
    assert engine.stats().running == 2 and engine.stats().waiting == 3
    tokens, _, _ = _drain(engine)
    for rid, t in first.items():
        tokens[rid] = t + tokens[rid]
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == _alone(model, p, 8)
    assert engine.stats().kv_blocks_used == 0


def test_a_full_queue_raises_queue_full_with_a_retry_hint(model):
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4, max_running=1, max_waiting=2))
    for i, p in enumerate(_prompts([3, 3])):
        engine.add(Request(str(i), p, 4))
    with pytest.raises(QueueFull) as caught:
        engine.add(Request("x", [1, 2], 4))
    assert caught.value.waiting == 2 and caught.value.retry_after_s >= 1
    engine.step()  # one admitted: a place in the queue frees up
    engine.add(Request("x", [1, 2], 4))


def test_abort_frees_the_blocks_and_ends_the_request(model):
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    engine.add(Request("a", _prompts([10])[0], 30))
    engine.add(Request("b", _prompts([5], seed=2)[0], 30))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used == 3 + 2
    engine.abort("a")
    engine.abort("nobody")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [("a", "abort")]
    assert engine.stats().kv_blocks_used == 2 and engine.stats().running == 1


def test_a_request_that_fails_inside_the_engine_fails_alone(model):
    """A forward hook that raises whenever token 13 is fed stands for a bug a request triggers."""
    prompts = _prompts([6, 9, 4], seed=4)
    prompts[1][2] = 13
    for p in (prompts[0], prompts[2]):
        assert 13 not in p + _alone(model, p, 5)

    def explode(_module, args):
        if (args[0] == 13).any():
            raise RuntimeError("token 13 broke the kernel")

    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    handle = model.model.embed_tokens.register_forward_pre_hook(explode)
    try:
        tokens, reasons, _ = _drain(engine, {0: [Request(str(i), p, 5) for i, p in enumerate(prompts)]})
    finally:
        handle.remove()
    assert reasons == {"0": "length", "1": "error", "2": "length"}
    assert tokens["0"] == _alone(model, prompts[0], 5) and tokens["2"] == _alone(model, prompts[2], 5)
    assert engine.stats().kv_blocks_used == 0


def test_static_batching_admits_only_into_an_empty_batch(model):
    prompts = _prompts([5, 6, 7])
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4, static=True))
    engine.add(Request("0", prompts[0], 2))
    engine.add(Request("1", prompts[1], 6))
    engine.step()
    engine.add(Request("2", prompts[2], 2))
    ran = []
    while engine.has_work():
        ran.append({o.request_id for o in engine.step()})
    joined = next(i for i, ids in enumerate(ran) if "2" in ids)
    assert all("1" not in ids for ids in ran[joined:]) and any("1" in ids for ids in ran[:joined])


@pytest.mark.parametrize("request_, field", [
    (Request("a", [], 4), "prompt"),
    (Request("a", [1, CFG.vocab_size], 4), "prompt"),
    (Request("a", [1, -1], 4), "prompt"),
    (Request("a", [1, 2], 0), "max_tokens"),
    (Request("a", [1] * 90, 7), "prompt"),  # 97 > the context of 96
    (Request("a", [1] * 10, 60), "max_tokens"),  # 70 tokens need 18 blocks of 4; the cache has 16
])
def test_requests_that_could_never_run_are_refused_naming_the_field(model, request_, field):
    engine = Engine(model, EngineConfig(kv_blocks=16, block_size=4))
    with pytest.raises(ConfigError, match=f"^{field}: "):
        engine.add(request_)
    assert not engine.has_work()


@pytest.mark.parametrize("config, message", [
    (EngineConfig(kv_blocks=0), "kv_blocks=0"),
    (EngineConfig(block_size=-1), "block_size=-1"),
    (EngineConfig(max_model_len=500), "max_model_len=500"),
    (EngineConfig(speculative=True), "MTP module"),
])
def test_bad_engine_config_is_refused(model, config, message):
    with pytest.raises(ConfigError, match=message):
        Engine(model, config)


def _mtp_model(echo: bool):
    """A model with an MTP module: an echoing one (drafts often accepted) or a random one."""
    cfg = CFG.replace(num_mtp_modules=1, vocab_size=61)
    return echo_mtp_model(cfg) if echo else make_model(cfg, seed=1)


@pytest.mark.parametrize("echo", [True, False], ids=["echo-mtp", "random-mtp"])
def test_speculative_decoding_gives_greedy_output_and_accepts_what_speculative_generate_accepts(echo):
    """Under continuous batching with chunked prefill, each request gets its greedy tokens and
    accepts exactly the drafts `speculative_generate` accepts for it alone."""
    model = _mtp_model(echo)
    prompts = [[t % 61 for t in p] for p in _prompts([5, 17, 3, 30, 9], seed=5)]
    max_tokens = [12, 7, 15, 4, 10]
    engine = Engine(model, EngineConfig(kv_blocks=64, block_size=4, max_running=3, step_tokens=12, speculative=True))
    schedule = {i: [Request(str(i), p, m)] for i, (p, m) in enumerate(zip(prompts, max_tokens))}
    tokens, last, step = {}, {}, 0
    while engine.has_work() or schedule:
        for request in schedule.pop(step, []):
            engine.add(request)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            last[out.request_id] = out
        step += 1
    total_accepted = 0
    for i, p in enumerate(prompts):
        alone = speculative_generate(model, [p], max_new_tokens=max_tokens[i], stop_ids=[])
        assert tokens[str(i)] == _alone(model, p, max_tokens[i]) == alone.tokens[0], i
        assert (last[str(i)].accepted, last[str(i)].drafted) == (alone.accepted, alone.drafted), i
        assert last[str(i)].finish_reason == "length"
        total_accepted += alone.accepted
    assert engine.stats().kv_blocks_used == 0
    assert (total_accepted > 0) == echo  # both paths ran: drafts accepted and rejected


def test_speculative_sampling_draws_from_the_target_distribution():
    """Speculative sampling (Leviathan et al. 2023) keeps the target distribution: over 3000
    requests, the second token (the one the draft test decides) follows p(x2 | prompt, x1)."""
    cfg = tiny_config(vocab_size=6, num_mtp_modules=1, max_position_embeddings=16)
    model = make_model(cfg, seed=2)
    prompt, n = [1, 2, 3], 3000
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2 = torch.stack([model(torch.tensor([prompt + [x]])).logits[0, -1].softmax(-1) for x in range(6)])
    exact = p1.unsqueeze(1) * p2  # P(x1, x2)
    engine = Engine(model, EngineConfig(kv_blocks=n, block_size=4, max_running=n, max_waiting=n, step_tokens=n * 3,
                                        speculative=True))
    for i in range(n):
        engine.add(Request(str(i), prompt, 3, Sampling(1.0, seed=i)))
    tokens, accepted, drafted = {}, {}, {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            accepted[out.request_id], drafted[out.request_id] = out.accepted, out.drafted
    counts = torch.zeros(6, 6)
    for t in tokens.values():
        counts[t[0], t[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.06, tv  # the TV distance of 3000 draws over 36 cells is ~0.04 by chance
    assert 0 < sum(o for o in accepted.values()) < sum(drafted.values())


def test_a_w8a8_model_serves_what_it_generates():
    """The engine runs the quantized modules as they are: each request equals W8A8 `generate` alone."""
    from moge.quant.model import quantize_model

    model = make_model(CFG)
    prompts = _prompts([9, 4, 13], seed=6)
    quantize_model(model, torch.tensor(prompts[0]).view(1, -1))
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4, step_tokens=8))
    tokens, _, _ = _drain(engine, {0: [Request(str(i), p, 6) for i, p in enumerate(prompts)]})
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == _alone(model, p, 6)


@pytest.mark.parametrize("scheme", ["int8-wo", "int4-wo"])
def test_a_weight_only_model_serves_what_it_generates(scheme):
    """Weight-only int8 / int4 modules (and their kernel) run inside continuous batching: each
    request equals that quantized model's `generate` alone."""
    from moge.quant.weight_only import quantize_weight_only

    model = make_model(CFG.replace(hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=64))
    quantize_weight_only(model, scheme)
    prompts = _prompts([9, 4, 13, 7], seed=8)
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4, step_tokens=8))
    tokens, _, _ = _drain(engine, {0: [Request(str(i), p, 6) for i, p in enumerate(prompts)]})
    for i, p in enumerate(prompts):
        assert tokens[str(i)] == _alone(model, p, 6)


def test_voted_experts_serve_and_equal_generate_for_a_lone_request():
    """Voting is a batch-level choice (the experts most chosen by the step's tokens), so a request
    alone in the engine gets what `generate` gives it alone; in a busy batch it still finishes."""
    from moge.nn.routing import set_num_voted_experts

    model = set_num_voted_experts(make_model(CFG.replace(num_experts=8, num_groups=2, top_k=2)), 2)
    prompt = _prompts([10], seed=7)[0]
    engine = Engine(model, EngineConfig(kv_blocks=32, block_size=4))
    tokens, _, _ = _drain(engine, {0: [Request("a", prompt, 6)]})
    assert tokens["a"] == _alone(model, prompt, 6)
    tokens, reasons, _ = _drain(engine, {0: [Request(str(i), p, 5) for i, p in enumerate(_prompts([3, 8, 5]))]})
    assert set(reasons.values()) == {"length"} and all(len(t) == 5 for t in tokens.values())


def test_decode_steps_run_through_the_thread_tuner_and_prefill_steps_do_not(model):
    """The tuner times only decode-only steps (comparable work); requests still equal `generate`,
    whichever thread count each step ran with, and the stats report the tuner's choice."""
    from moge.inference.threads import ThreadTuner

    counts: list[int] = []
    clock = iter(range(10**6))
    tuner = ThreadTuner(2, probe_steps=1, period=4, set_threads=counts.append, clock=lambda: float(next(clock)))
    engine = Engine(model, EngineConfig(kv_blocks=64, block_size=4, max_running=4, step_tokens=8), threads=tuner)
    prompts = _prompts([9, 5, 12])
    schedule = {0: [Request("a", prompts[0], 6)], 3: [Request("b", prompts[1], 5), Request("c", prompts[2], 4)]}
    tokens, _, steps = _drain(engine, schedule)
    for rid, prompt, n in (("a", prompts[0], 6), ("b", prompts[1], 5), ("c", prompts[2], 4)):
        assert tokens[rid] == _alone(model, prompt, n)
    timed = sum(tuner.used.values())
    assert 0 < timed < steps  # prompt chunks (at least 4 of the steps) were not timed
    assert set(counts) <= {1, 2} and counts  # the tuner set thread counts
    assert engine.stats().threads == tuner.choice
