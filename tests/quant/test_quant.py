"""W8A8: integer matmul against exact references, quantization error bounds, exact smoothing,
quantized model vs float, checkpoint round trip and bad inputs, `moge quantize` end to end."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moge.checkpoint import CheckpointError, load_pretrained, save_pretrained
from moge.nn.experts import SwiGLUExperts
from moge.inference.generate import generate
from moge.checkpoint.quantized import load_quantized, save_quantized
from moge.quant import (QuantExperts, QuantLinear, balanced_calibration_set, dequantize, int8_kernel, int8_mm,
                        quantize_model, quantize_per_channel, quantize_per_token, set_int8_kernel, weight_memory)
from moge.quant.calibrate import select_balanced
from moge.quant.smoothing import expert_aware_factors, smooth_attention, smooth_mlp, smoothquant_factors
from models import make_model, tiny_config

TINY = tiny_config()


@pytest.fixture(params=["int32", "int_mm", "gemv"])
def kernel(request):
    set_int8_kernel(request.param)
    yield request.param
    set_int8_kernel("auto")


# ---- integer matmul ------------------------------------------------------------------------------


@given(st.integers(0, 20), st.integers(1, 70), st.integers(1, 40), st.integers(0, 2**16))
def test_int8_mm_is_exact(M, K, N, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    want = a.long() @ b.long().t()
    for k in ("int32", "int_mm", "gemv"):
        set_int8_kernel(k)
        got = int8_mm(a, b)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    set_int8_kernel("auto")


def test_int8_mm_extreme_values_and_strided_operands(kernel):
    a = torch.full((3, 1024), 127, dtype=torch.int8)
    b = torch.full((2, 1024), -127, dtype=torch.int8)
    assert int(int8_mm(a, b)[0, 0]) == -127 * 127 * 1024  # no 16-bit saturation anywhere
    stacked = torch.randint(-127, 128, (4, 6, 10), dtype=torch.int8)
    x = torch.randint(-127, 128, (10, 20), dtype=torch.int8)[:, ::2]  # non-contiguous
    assert torch.equal(int8_mm(x, stacked[2, 1:5]).long(), x.long() @ stacked[2, 1:5].long().t())


def test_int8_mm_bad_inputs():
    a = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match=r"a must be an int8 tensor, got torch.float32"):
        int8_mm(a.float(), a)
    with pytest.raises(TypeError, match=r"b must be an int8 tensor, got torch.int32"):
        int8_mm(a, a.int())
    with pytest.raises(ValueError, match=r"b must be 2-D, got shape \(1, 2, 4\)"):
        int8_mm(a, a.view(1, 2, 4))
    with pytest.raises(ValueError, match=r"inner dims differ"):
        int8_mm(a, torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="kernel='fast' is invalid"):
        set_int8_kernel("fast")
    assert int8_kernel() in ("int32", "int_mm", "gemv+int_mm", "gemv+int32")


# ---- quantization --------------------------------------------------------------------------------


@given(st.integers(1, 12), st.integers(1, 40), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_quantize_dequantize_error_bounds(N, K, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * spread
    w[0] = 0.0  # an all-zero row stays zero
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (N,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    err = (w - dequantize(q, s)).abs()
    assert bool((err <= s.unsqueeze(-1) * (0.5 + 1e-5)).all())
    assert bool((q[1:].abs().amax(-1) == 127).all())  # the row max maps to +-127
    assert bool((q[0] == 0).all())
    x = torch.randn(N, K, generator=gen) * spread
    qx, sx = quantize_per_token(x)
    assert bool(((x - qx.float() * sx.unsqueeze(-1)).abs() <= sx.unsqueeze(-1) * (0.5 + 1e-5)).all())
    qe, se = quantize_per_channel(torch.randn(3, N, K, generator=gen))  # stacked experts: per (expert, row)
    assert qe.shape == (3, N, K) and se.shape == (3, N)


def test_quantize_bad_inputs():
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor, got dtype torch.int8"):
        quantize_per_channel(torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"at least 2 dims"):
        quantize_per_channel(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_per_channel(torch.tensor([[1.0, float("nan")]]))


def test_int8_linear_is_the_float_product_of_the_dequantized_operands(kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    q = QuantLinear.from_linear(lin)
    x = torch.randn(2, 3, 24) * 3
    y = q(x)
    qx, sx = quantize_per_token(x.reshape(-1, 24))
    exact = (qx.long() @ q.weight.long().t()).double()  # integer sums, exactly
    want = exact * sx.double().unsqueeze(-1) * q.weight_scale.double() + lin.bias.double()
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y.reshape(-1, 10).double(), want, rtol=1e-6, atol=1e-6)
    deq = dequantize(qx, sx).double() @ q.dequantized_weight().double().t() + lin.bias.double()
    torch.testing.assert_close(y.reshape(-1, 10).double(), deq, rtol=1e-5, atol=1e-5)
    assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()  # and close to the float layer
    with pytest.raises(ValueError, match="in_features=24"):
        q(torch.randn(2, 5))


def _reference_quant_experts(x, experts_TK, weights_TK, qe: QuantExperts):
    """Token by token from the definition, in float64: per-token int8 input, int8 weights, SwiGLU,
    per-token int8 activation, int8 down weights, weighted sum."""
    gu, dn = (t.double() for t in qe.dequantized())
    f = qe.intermediate_size
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        qx, sx = quantize_per_token(x[t:t + 1])
        xt = qx.double() * sx.double()
        for e, w in zip(experts_TK[t].tolist(), weights_TK[t].double()):
            h = xt @ gu[e].t()
            act = (F.silu(h[:, :f]) * h[:, f:]).float()
            qa, sa = quantize_per_token(act)
            out[t] += w * (qa.double() * sa.double() @ dn[e].t())[0]
    return out


def test_quant_experts_match_a_reference(kernel):
    torch.manual_seed(1)
    experts = SwiGLUExperts(6, 16, 8)
    qe = QuantExperts.from_experts(experts)
    x = torch.randn(9, 16)
    experts_TK = torch.stack([torch.randperm(6)[:3] for _ in range(9)])
    weights_TK = torch.rand(9, 3)
    y = qe(x, experts_TK, weights_TK)
    torch.testing.assert_close(y.double(), _reference_quant_experts(x, experts_TK, weights_TK, qe),
                               rtol=1e-4, atol=1e-5)
    one = torch.cat([qe(x[t:t + 1], experts_TK[t:t + 1], weights_TK[t:t + 1]) for t in range(9)])
    torch.testing.assert_close(one, y, rtol=1e-5, atol=1e-6)  # the one-token path agrees
    full = experts(x, experts_TK, weights_TK)
    assert (y - full).abs().max() < 0.05 * full.abs().max()


# ---- smoothing -----------------------------------------------------------------------------------


def test_expert_aware_factors_follow_the_paper_formula():
    torch.manual_seed(2)
    D, alpha = 6, 0.6
    act = torch.rand(D) * 10
    gate = torch.randn(4, D)
    gate_up = torch.randn(3, 8, D) * torch.rand(3, 1, D)
    s = expert_aware_factors(act, gate, gate_up, alpha)
    for j in range(D):
        candidates = [act[j] ** alpha / gate[:, j].abs().max() ** (1 - alpha)]
        candidates += [act[j] ** alpha / gate_up[i, :, j].abs().max() ** (1 - alpha) for i in range(3)]
        assert math.isclose(float(s[j]), float(max(candidates)), rel_tol=1e-5)
    w = torch.randn(5, D)
    sq = smoothquant_factors(act, [w, gate], alpha)
    torch.testing.assert_close(sq, act ** alpha / torch.cat([w, gate]).abs().amax(0) ** (1 - alpha))
    with pytest.raises(ValueError, match="alpha=1.5 is invalid"):
        expert_aware_factors(act, gate, gate_up, 1.5)
    with pytest.raises(ValueError, match=r"act_max has shape \(5,\), expected \[6\]"):
        smoothquant_factors(act[:5], [w], 0.5)


def test_smoothing_leaves_the_float_model_unchanged():
    model = make_model(TINY.replace(shared_expert_intermediate_size=24))
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        before = model(ids).logits
        gen = torch.Generator().manual_seed(3)
        for layer in model.model.layers:  # outlier-heavy factors, far from 1
            act = torch.rand(TINY.hidden_size, generator=gen) * 50
            act[0] = 500.0
            s1 = smooth_attention(layer.input_layernorm, layer.self_attn, act, 0.8)
            s2 = smooth_mlp(layer.post_attention_layernorm, layer.mlp, act.flip(0), 0.3)
            assert (s1.max() / s1.min()) > 5 and (s2.max() / s2.min()) > 5
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# ---- whole model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized():
    model = make_model()
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(4))
    q = copy.deepcopy(model)
    report = quantize_model(q, ids, alpha_grid=(0.4, 0.7))
    return model, q.eval(), report


def test_quantized_model_is_close_to_float(quantized):
    model, q, report = quantized
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got = model(ids, return_routing=True), q(ids, return_routing=True)
    rel = (got.logits - ref.logits).norm() / ref.logits.norm()
    assert rel < 0.02
    assert (got.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean() > 0.9
    for r0, r1 in zip(ref.routing, got.routing):
        assert (r0.experts_TK.sort(-1).values == r1.experts_TK.sort(-1).values).float().mean() > 0.9
    names = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert "model.layers.1.self_attn.o_proj" in names and "model.layers.0.mlp.shared_expert.down_proj" in names
    assert isinstance(q.model.layers[0].mlp.experts, QuantExperts)
    assert q.model.layers[0].mlp.router.gate.weight.dtype == torch.float32 and q.lm_head.weight.dtype == torch.float32
    assert sorted(report.linear_modules) == sorted(names)
    assert all(a in (0.4, 0.7) for a in report.attention_alpha + report.moe_alpha)
    assert set(report.moe_scores[0]) == {0.4, 0.7} and "kl" in report.moe_scores[0][0.4]
    mem_q, mem_f = weight_memory(q), weight_memory(model)
    assert mem_q["quantized_as_fp32_bytes"] / (mem_q["quantized_int8_bytes"] + mem_q["quantized_scale_bytes"]) > 3
    assert mem_q["total_bytes"] < mem_f["total_bytes"]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q)
    with pytest.raises(ValueError, match="alpha grid"):
        quantize_model(make_model(), alpha=2.0)


def test_smoothing_removes_the_error_of_outlier_channels():
    from moge.quant.smoothing import fold, moe_consumers

    model = make_model()
    with torch.no_grad():  # outlier channels (x100) after every norm; the float function stays the same
        for layer in model.model.layers:
            s = torch.ones(TINY.hidden_size)
            s[[3, 17]] = 0.01
            attn = layer.self_attn
            fold(layer.input_layernorm.weight, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], s)
            router, gate_up, shared = moe_consumers(layer.mlp)
            fold(layer.post_attention_layernorm.weight, [router, gate_up, *shared], s)
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(6))
    plain, smoothed = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(plain)
    quantize_model(smoothed, ids, alpha=0.5)
    with torch.no_grad():
        ref = model(ids).logits
        err_plain = (plain(ids).logits - ref).norm() / ref.norm()
        err_smoothed = (smoothed(ids).logits - ref).norm() / ref.norm()
    assert err_smoothed < 0.5 * err_plain


def test_plain_quantization_without_calibration():
    model = make_model()
    q = copy.deepcopy(model)
    report = quantize_model(q)
    assert report.attention_alpha == [None, None]
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert (q(ids).logits - model(ids).logits).norm() < 0.05 * model(ids).logits.norm()


def test_save_load_round_trip_is_bit_exact(quantized, tmp_path):
    _, q, report = quantized
    save_quantized(q, tmp_path / "q", report=report.to_dict())
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "moge-w8a8"
    loaded = load_quantized(tmp_path / "q")
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert b["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.int8
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, loaded(ids).logits)
    via = load_pretrained(tmp_path / "q")  # the generic loader recognises the format
    with torch.no_grad():
        assert torch.equal(via(ids).logits, loaded(ids).logits)
    out = generate(via, [[3, 4, 5]], max_new_tokens=4)
    assert len(out.tokens[0]) >= 1
    save_quantized(loaded, tmp_path / "q")  # saving again over itself works
    assert torch.equal(load_quantized(tmp_path / "q").state_dict()["lm_head.weight"], a["lm_head.weight"])


def test_tied_embeddings_round_trip(tmp_path):
    model = make_model(TINY.replace(tie_word_embeddings=True))
    quantize_model(model)
    save_quantized(model, tmp_path / "t")
    loaded = load_quantized(tmp_path / "t", dtype="bf16")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 97)


def _rewrite(path, **changes):
    tensors = load_file(path)
    for key, value in changes.items():
        tensors[key] = value(tensors[key]) if callable(value) else value
    save_file(tensors, path)


def _rewrite_config(directory, fn):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case,pattern", [
    ("truncated", r"model.safetensors is not a readable safetensors file"),
    ("shape", r"model.layers.0.self_attn.q_proj.weight: expected shape \[32, 32\], found \[32, 31\]"),
    ("dtype", r"model.layers.1.mlp.experts.down_proj: expected dtype torch.int8, found torch.float32"),
    ("float_dtype", r"model.embed_tokens.weight: expected a floating-point dtype, found torch.int64"),
    ("missing", r"missing tensors \(1\): model.layers.0.self_attn.k_proj.weight_scale"),
    ("scale", r"model.layers.0.mlp.experts.gate_up_scale holds the scale -1.0"),
    ("minus128", r"q_proj.weight holds the int8 value -128, outside -127..127"),
    ("method", r"quantization_config.quant_method='gptq' is not supported: expected 'moge-w8a8'"),
    ("version", r"quantization_config.format_version=7 is not supported"),
    ("modules", r"lists 'model.layers.0.mlp.router.gate' as a quantized SwiGLUExperts, but the model built from "
                r"config.json has Linear there"),
    ("not_dict", r"quantization_config must be a JSON object, got list"),
    ("module_list", r"quantization_config.modules.linear='all' is invalid"),
])
def test_corrupt_or_mismatched_checkpoints_are_refused(quantized, tmp_path, case, pattern):
    _, q, _ = quantized
    d = save_quantized(q, tmp_path / case)
    weights = d / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "shape":
        _rewrite(weights, **{"model.layers.0.self_attn.q_proj.weight": lambda t: t[:, :31].contiguous()})
    elif case == "dtype":
        _rewrite(weights, **{"model.layers.1.mlp.experts.down_proj": lambda t: t.float()})
    elif case == "float_dtype":
        _rewrite(weights, **{"model.embed_tokens.weight": lambda t: t.long()})
    elif case == "missing":
        tensors = load_file(weights)
        del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
        save_file(tensors, weights)
    elif case == "scale":
        _rewrite(weights, **{"model.layers.0.mlp.experts.gate_up_scale": lambda t: t.index_fill(1, torch.tensor([0]),
                                                                                                 -1.0)})
    elif case == "minus128":
        _rewrite(weights, **{"model.layers.0.self_attn.q_proj.weight": lambda t: t.index_fill(1, torch.tensor([0]),
                                                                                               -128)})
    elif case == "method":
        _rewrite_config(d, lambda c: c["quantization_config"].update(quant_method="gptq"))
    elif case == "version":
        _rewrite_config(d, lambda c: c["quantization_config"].update(format_version=7))
    elif case == "modules":
        _rewrite_config(d, lambda c: c["quantization_config"]["modules"]["experts"].append(
            "model.layers.0.mlp.router.gate"))
    elif case == "not_dict":
        _rewrite_config(d, lambda c: c.update(quantization_config=[1]))
    elif case == "module_list":
        _rewrite_config(d, lambda c: c["quantization_config"]["modules"].update(linear="all"))
    with pytest.raises(CheckpointError, match=pattern):
        load_quantized(d)


def test_saving_needs_a_quantized_model_and_a_free_directory(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="no quantized modules"):
        save_quantized(model, tmp_path / "a")
    save_pretrained(model, tmp_path / "float")
    quantize_model(model)
    with pytest.raises(ValueError, match="holds a sharded float checkpoint"):
        save_quantized(model, tmp_path / "float")


# ---- calibration set -----------------------------------------------------------------------------


def test_balanced_selection_reaches_rare_experts():
    # 1 layer, 4 experts; windows 0-5 only use experts 0/1, window 6 reaches 2, window 7 reaches 3
    counts = torch.zeros(8, 1, 4, dtype=torch.long)
    counts[:6, 0, :2] = 10
    counts[6, 0, 2] = 3
    counts[7, 0, 3] = 2
    chosen = select_balanced(counts, 3)
    assert set(chosen) >= {6, 7}
    assert int(counts[chosen].sum(0).min()) > 0
    with pytest.raises(ValueError, match="cannot choose 9 windows from a pool of 8"):
        select_balanced(counts, 9)


# ---- CLI end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_and_checkpoint(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    (root / "data").symlink_to(corpus / "data")  # the generated corpus of tests/conftest.py
    cfg = tiny_config(vocab_size=300, num_heads=2, num_kv_heads=1, shared_expert_intermediate_size=16, eos_token_id=2,
                      pad_token_id=0, bos_token_id=2)
    model = make_model(cfg)
    save_pretrained(model, root / "ckpt")
    return root


def test_cli_quantize_then_generate(corpus_and_checkpoint, tmp_path, capsys):
    from moge.cli import main

    root = corpus_and_checkpoint
    args = ["quantize", "--model", str(root / "ckpt"), "--data", str(root / "data"), "--out", str(tmp_path / "q"),
            "--calib-windows", "4", "--seq-len", "16", "--pool", "8", "--alpha-grid", "0.5,0.8"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["moe_alpha"]) == 2 and all(a in (0.5, 0.8) for a in result["moe_alpha"])
    assert all(c > 0 for c in result["calibration"]["per_expert_min_tokens"])
    assert result["quantized_matrices_fp32_bytes"] > 3 * result["quantized_matrices_int8_bytes"]
    assert (tmp_path / "q" / "tokenizer.json").exists()  # taken from the corpus
    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "thou art", "--max-new-tokens", "3",
                 "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert 1 <= len(gen["completions"][0]["tokens"]) <= 3
    assert main(args + ["--alpha", "1.5"]) == 2
    assert "--alpha=1.5 is invalid" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "expert-aware smoothing" in capsys.readouterr().out


def test_balanced_calibration_set_on_a_corpus(corpus_and_checkpoint):
    root = corpus_and_checkpoint
    model = load_pretrained(root / "ckpt")
    calib = balanced_calibration_set(model, root / "data", windows=3, seq_len=16, pool=6)
    assert calib.input_ids.shape == (3, 16) and calib.expert_counts.shape == (2, 8)
    assert int(calib.expert_counts.sum()) == 2 * 3 * 16 * 4  # layers x tokens x K
    summary = calib.summary()
    assert len(summary["per_expert_min_tokens"]) == 2 and "random_windows_per_expert_min_tokens" in summary
