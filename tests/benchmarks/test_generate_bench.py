"""benchmarks/generate.py's quantized rows: `moge-int8`, `moge-int4` and `moge-w8a8` are our model
quantized in process, timed by the same code as the `moge` row (and, with --compile, each again as
`<row>-compiled`), and they generate the float model's tokens where the quantization error is too
small to flip a greedy choice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from moge.inference.generate import Sampling, generate
from moge.quant import QuantExperts, QuantLinear, WOExperts, WOLinear
from models import tiny_config

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "generate.py"
_spec = importlib.util.spec_from_file_location("moge_bench_generate", _PATH)
gb = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gb
_spec.loader.exec_module(gb)

CFG = tiny_config(vocab_size=61, hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=64)


def test_quantized_rows_are_timed_like_ours_and_keep_the_float_model_untouched():
    ours = gb.build_ours(CFG, 0)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    quantized = {name: gb.build_quantized(ours, name) for name in gb.QUANTIZED}
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    for name, model in quantized.items():
        attn, experts = model.model.layers[0].self_attn, model.model.layers[0].mlp.experts
        if name == "w8a8":
            assert isinstance(attn.q_proj, QuantLinear) and isinstance(experts, QuantExperts)
        else:
            assert isinstance(attn.q_proj, WOLinear) and isinstance(experts, WOExperts)
            assert experts.scheme == gb.QUANTIZED[name]
    res = gb.bench_batch(ours, {}, CFG, batch=2, prompt_len=6, new_tokens=3, reps=1, seed=0, quantized=quantized)
    assert set(res) == {"moge", "moge-int8", "moge-int4", "moge-w8a8"}
    # --compile: each row again, decoding compiled (untuned: tuning compiles a graph per thread count)
    compiled = gb.bench_batch(ours, {}, CFG, batch=2, prompt_len=6, new_tokens=3, reps=1, seed=0,
                              quantized={"int4": quantized["int4"]}, compiled=True, tune=False)
    assert set(compiled) == {"moge", "moge-int4", "moge-compiled", "moge-int4-compiled"}
    for row in [*res.values(), *compiled.values()]:
        assert {"prefill_tok_s", "decode_tok_s", "decode_ms_per_step"} <= set(row)
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    prompt = [[3, 5, 7, 9]]
    want = generate(ours, prompt, max_new_tokens=4, sampling=Sampling(), stop_ids=[]).tokens
    assert generate(quantized["int8"], prompt, max_new_tokens=4, sampling=Sampling(), stop_ids=[]).tokens == want
