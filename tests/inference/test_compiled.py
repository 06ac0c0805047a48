"""Compiled decoding (moge.inference.compiled): the static-cache step equals eager decoding, compiles
once per batch size (later steps and generations replay it), and refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moge.errors import ConfigError
from moge.inference.compiled import CACHE_BUCKET, CompiledDecoder, compiled_decoder
from moge.inference.generate import Sampling, generate
from moge.nn.model import KVCache
from moge.quant import quantize_weight_only
from models import make_model, tiny_config

# quantizable by int4-wo (every input dim a multiple of 32)
CFG = tiny_config(vocab_size=61, hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=64,
                  max_position_embeddings=300)


@pytest.fixture(scope="module")
def model():
    return make_model(CFG)


def test_decode_step_equals_the_cached_forward_with_padding(model):
    """Left-padded rows: logits of the static step equal forward's with the same cache contents."""
    ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.inference_mode():
        caches = [KVCache.allocate(CFG, 2, 40, torch.float32) for _ in range(2)]
        for c in caches:
            model(ids, cache=c, attention_mask=mask)
        nxt = torch.tensor([[5], [9]])
        want = model(nxt, cache=caches[0]).logits[:, -1]
        got = model.decode_step(nxt, torch.tensor([caches[1].length]), caches[1])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert bool(caches[1].valid_BT[:, 7].all()) and not bool(caches[1].valid_BT[1, :3].any())


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), steps=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_static_steps_equal_cached_forward_steps(model, lengths, steps, seed):
    """Any left-padded batch, any number of steps: decode_step's logits equal forward's, step by
    step, on caches filled by the same prefill (eager: the property of the step, not the compiler)."""
    gen = torch.Generator().manual_seed(seed)
    B, longest = len(lengths), max(lengths)
    ids = torch.randint(3, 61, (B, longest), generator=gen)
    mask = torch.zeros(B, longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, longest - n:] = 1
    padded = mask if bool((mask == 0).any()) else None
    with torch.inference_mode():
        caches = [KVCache.allocate(CFG, B, longest + steps, torch.float32) for _ in range(2)]
        for c in caches:
            model(ids, cache=c, attention_mask=padded)
        for _ in range(steps):
            nxt = torch.randint(3, 61, (B, 1), generator=gen)
            want = model(nxt, cache=caches[0]).logits[:, -1]
            got = model.decode_step(nxt, torch.tensor([caches[1].length]), caches[1])
            caches[1].length += 1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(9,), (9, 4, 13)], ids=["one", "padded-batch"])
def test_compiled_generation_equals_eager_and_recompiles_for_nothing(model, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(3, 61, (n,), generator=gen).tolist() for n in lengths]
    want = generate(model, prompts, max_new_tokens=20, stop_ids=[])
    first = generate(model, prompts, max_new_tokens=20, stop_ids=[], compile=True)
    assert first.tokens == want.tokens
    # same batch size, other lengths within the cache bucket: the graph is replayed, never rebuilt
    other = [p[: max(1, len(p) - 2)] for p in prompts]
    with torch.compiler.set_stance("fail_on_recompile"):
        again = generate(model, other, max_new_tokens=30, stop_ids=[], compile=True)
    assert again.tokens == generate(model, other, max_new_tokens=30, stop_ids=[]).tokens


def test_sampling_and_stop_tokens_work_as_in_eager(model):
    prompts = [[3, 4, 5, 6]]
    sampling = Sampling(temperature=0.8, top_k=10, seed=7)
    want = generate(model, prompts, max_new_tokens=12, sampling=sampling, stop_ids=[])
    got = generate(model, prompts, max_new_tokens=12, sampling=sampling, stop_ids=[], compile=True)
    assert got.tokens == want.tokens
    stop = want.tokens[0][5]
    cut = generate(model, prompts, max_new_tokens=12, sampling=sampling, stop_ids=[stop], compile=True)
    assert cut.tokens[0] == want.tokens[0][: want.tokens[0].index(stop) + 1] and cut.finished == [True]


def test_weight_only_models_compile_through_the_kernel():
    qmodel = make_model(CFG)
    quantize_weight_only(qmodel, "int4-wo")
    prompts = [[3, 4, 5, 6, 7]]
    want = generate(qmodel, prompts, max_new_tokens=10, stop_ids=[])
    assert generate(qmodel, prompts, max_new_tokens=10, stop_ids=[], compile=True).tokens == want.tokens


def test_the_cache_is_bucketed_reused_and_reset(model):
    decoder = compiled_decoder(model)
    assert compiled_decoder(model) is decoder
    cache = decoder.cache_for(2, 10, torch.float32, "cpu")
    assert cache.max_len == CACHE_BUCKET and cache.length == 0
    cache.length, cache.valid_BT[:, :4] = 4, True
    again = decoder.cache_for(2, CACHE_BUCKET - 1, torch.float32, "cpu")
    assert again is cache and again.length == 0 and not bool(again.valid_BT.any())
    assert decoder.cache_for(2, 290, torch.float32, "cpu").max_len == 300  # capped at the context
    with pytest.raises(ConfigError, match="sequence length 301 exceeds max_position_embeddings=300"):
        decoder.cache_for(1, 301, torch.float32, "cpu")


def test_a_full_cache_and_a_parallel_model_are_refused(model):
    decoder = compiled_decoder(model)
    cache = decoder.cache_for(1, 4, torch.float32, "cpu")
    cache.length = cache.max_len
    with pytest.raises(ConfigError, match=f"sequence length {CACHE_BUCKET + 1} exceeds the KV cache size"):
        decoder(torch.tensor([[3]]), cache)
    split = make_model(CFG)
    split.global_slices = {}  # what moge.parallel.parallelize leaves on a model it split
    with pytest.raises(ConfigError, match="compiled decoding runs single-process models"):
        CompiledDecoder(split)


def test_generate_command_compile_flag(tmp_path, capsys, model):
    import json

    from moge.checkpoint import save_pretrained
    from moge.cli import main

    save_pretrained(model, tmp_path)
    args = ["generate", "--model", str(tmp_path), "--token-ids", "3,4,5", "--max-new-tokens", "6", "--json",
            "--threads", "1"]
    assert main(args) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main([*args, "--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["completions"] == eager["completions"]
    assert main([*args, "--compile", "--speculative"]) == 2
    assert "--compile runs plain single-process decoding" in capsys.readouterr().err


def test_a_thread_tuner_switching_counts_mid_generation_gives_the_same_tokens(model):
    """The thread count is part of a compiled CPU graph: a tuner probing 1 and 2 threads makes the
    decoder compile per count (never reuse a graph across counts) and the tokens stay eager's."""
    from moge.inference.threads import ThreadTuner

    prompts = [[3, 4, 5, 6, 7, 8]]
    want = generate(model, prompts, max_new_tokens=24, stop_ids=[])
    threads = torch.get_num_threads()
    try:
        tuner = ThreadTuner(2, probe_steps=1, period=3)
        got = generate(model, prompts, max_new_tokens=24, stop_ids=[], compile=True, threads=tuner)
    finally:
        torch.set_num_threads(threads)
    assert got.tokens == want.tokens
    assert set(tuner.used) == {1, 2} and tuner.probes > 2
