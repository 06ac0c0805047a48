"""benchmarks/generate.py's weight-only rows: `moge-int8` and `moge-int4` are our model quantized in
process, timed by the same code as the `moge` row, and they generate the float model's tokens
where the quantization error is too small to flip a greedy choice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from moge.inference.generate import Sampling, generate
from moge.quant import WOExperts, WOLinear
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
        assert isinstance(attn.q_proj, WOLinear) and isinstance(experts, WOExperts)
        assert experts.scheme == gb.QUANTIZED[name]
    res = gb.bench_batch(ours, {}, CFG, batch=2, prompt_len=6, new_tokens=3, reps=1, seed=0, quantized=quantized)
    assert set(res) == {"moge", "moge-int8", "moge-int4"}
    for row in res.values():
        assert set(row) == set(res["moge"]) and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    prompt = [[3, 5, 7, 9]]
    want = generate(ours, prompt, max_new_tokens=4, sampling=Sampling(), stop_ids=[]).tokens
    assert generate(quantized["int8"], prompt, max_new_tokens=4, sampling=Sampling(), stop_ids=[]).tokens == want
