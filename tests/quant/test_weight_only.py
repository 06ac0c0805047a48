"""Weight-only int8 / int4 quantization (moge.quant.weight_only): the C++ kernel against F.linear of
the dequantized weights, the modules against a float model holding those weights, checkpoints,
the torch fallback, bad input, and expert parallelism against one process."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import moge.quant.weight_only as wo
from moge.checkpoint import CheckpointError, load_pretrained, save_pretrained
from moge.checkpoint.quantized import load_quantized, save_quantized
from moge.errors import ConfigError
from moge.inference.generate import Sampling, generate
from moge.nn.experts import SwiGLUExperts
from moge.kernels import gemv
from moge.quant import WOExperts, WOLinear, quantize_model, quantize_weight_only
from models import make_model, tiny_config

# every quantized input dim (hidden 64, heads 4 x 16, experts 32, shared 64) a multiple of 32
CFG = tiny_config(vocab_size=61, hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=64)
SCHEMES = [("int8-wo", True), ("int4-wo", True), ("int4-wo", False)]
SCHEME_IDS = ["int8", "int4-sym", "int4-asym"]


@pytest.fixture(autouse=True)
def _default_kernel():
    gemv.set_kernel("auto")
    yield
    gemv.set_kernel("auto")


def _quantize(w, scheme, symmetric, group=32):
    if scheme == "int8-wo":
        q, s = wo.quantize_int8_wo(w)
        return q, s, None, wo.dequantize_int8_wo(q, s)
    q, s, z = wo.quantize_int4_wo(w, group, symmetric)
    return q, s, z, wo.dequantize_int4_wo(q, s, z)


def _reference(x, deq_ENK, row_expert):
    """F.linear of each row with its expert's dequantized weight, in fp32."""
    return torch.stack([F.linear(x[r], deq_ENK[int(e)]) for r, e in enumerate(row_expert)]) if len(x) else \
        x.new_zeros(0, deq_ENK.shape[1])


# ---- kernel ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 17), n=st.integers(1, 21), k_blocks=st.integers(1, 5), experts=st.integers(1, 4),
       scheme=st.sampled_from(SCHEMES), group_blocks=st.sampled_from([1, 2]), kernel=st.sampled_from(["cpp", "torch"]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_linear_of_the_dequantized_weights(rows, n, k_blocks, experts, scheme, group_blocks, kernel,
                                                         seed):
    """Any rows (1..17), odd N, stacked experts with rows grouped by expert id (runs in any order):
    equal to F.linear of the dequantized weight up to fp32 summation order."""
    gen = torch.Generator().manual_seed(seed)
    group = 32 * group_blocks
    K = 32 * k_blocks * group_blocks
    if scheme[0] == "int8-wo":
        K += int(torch.randint(0, 16, (1,), generator=gen))  # int8 takes any K (vector tails)
    w = torch.randn(experts, n, K, generator=gen)
    q, s, z, deq = _quantize(w, *scheme, group)
    x = torch.randn(rows, K, generator=gen)
    row_expert = torch.randint(0, experts, (rows,), generator=gen).sort().values.flip(0)  # runs, descending
    gemv.set_kernel(kernel)
    got = wo.wo_matmul(x, q, s, z, row_expert)
    want = _reference(x, deq, row_expert)
    scale = want.abs().max().item() + 1.0
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 2e-5 * scale * K ** 0.5


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_kernel_path_and_torch_fallback_agree_and_the_cpp_kernel_is_used(scheme):
    assert gemv.kernel() == "cpp"  # this machine has a compiler: the tests cover the C++ kernel
    w = torch.randn(3, 37, 96)
    q, s, z, _ = _quantize(w, *scheme)
    x = torch.randn(9, 96)
    ids = torch.tensor([2, 2, 0, 0, 0, 1, 1, 1, 1])
    got = wo.wo_matmul(x, q, s, z, ids)
    gemv.set_kernel("torch")
    assert torch.allclose(got, wo.wo_matmul(x, q, s, z, ids), rtol=1e-5, atol=1e-5)


# ---- quantizers -----------------------------------------------------------------------------------


def test_int4_pack_round_trips_and_puts_element_j_and_j_plus_16_in_one_byte():
    u = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = wo.pack_int4(u)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(wo.unpack_int4(packed), u)
    assert int(packed[1, 2, 20]) == int(u[1, 2, 36]) | (int(u[1, 2, 52]) << 4)  # block 1, byte 4


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_round_to_nearest_error_is_at_most_half_a_step(scheme):
    w = torch.randn(7, 128) * torch.logspace(-2, 1, 7)[:, None]
    q, s, z, deq = _quantize(w, *scheme)
    signed = (s.unsqueeze(-1) if scheme[0] == "int8-wo" else s.repeat_interleave(32, -1)).expand_as(w)
    err, step, tol = (deq - w).abs(), signed.abs(), 1e-6 * w.abs()
    # q4_0 codes are -8..7: on the far side of a group's peak the top half step is clamped to 7
    inside = w / signed <= 7.5 if scheme == ("int4-wo", True) else torch.ones_like(w, dtype=torch.bool)
    assert bool((err[inside] <= step[inside] / 2 + tol[inside]).all())
    assert bool((err <= step + tol).all())
    if scheme == ("int4-wo", True):  # q4_0: each group's largest-magnitude weight is exact
        g = w.reshape(7, 4, 32)
        idx = g.abs().argmax(-1, keepdim=True)
        assert torch.allclose(deq.reshape(7, 4, 32).gather(-1, idx), g.gather(-1, idx), rtol=1e-6)


def test_group_size_must_be_a_multiple_of_32_dividing_every_input_dim():
    model = make_model(CFG)
    with pytest.raises(ConfigError, match=r"group_size=48 is invalid: it is not a multiple of 32; valid group sizes "
                                          r"for these input dims \[32, 64\]: \[32\]"):
        quantize_weight_only(copy.deepcopy(model), "int4-wo", group_size=48)
    with pytest.raises(ConfigError, match=r"group_size=64 is invalid: it does not divide the input dim of "
                                          r"expert_intermediate_size=32; valid group sizes .*: \[32\]"):
        quantize_weight_only(copy.deepcopy(model), "int4-wo", group_size=64)
    with pytest.raises(ConfigError, match="group_size=0 is invalid"):
        WOLinear(64, 8, scheme="int4-wo", group_size=0)
    with pytest.raises(ConfigError, match="valid group sizes .*none"):
        quantize_weight_only(make_model(tiny_config()), "int4-wo")  # hidden 32 but experts 16 wide
    with pytest.raises(ConfigError, match=r"weight-only scheme='int2-wo' is invalid: choose one of "
                                          r"\('int8-wo', 'int4-wo'\)"):
        quantize_weight_only(copy.deepcopy(model), "int2-wo")
    q = copy.deepcopy(model)
    quantize_weight_only(q, "int8-wo")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_weight_only(q, "int8-wo")


# ---- modules and models -----------------------------------------------------------------------------


def _dequantized_float_model(model, quantized):
    """The float model holding exactly the weights the quantized modules compute with."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, WOLinear):
                mods[name].weight.copy_(m.dequantized_weight())
            elif isinstance(m, WOExperts):
                gate_up, down = m.dequantized()
                mods[name].gate_up_proj.copy_(gate_up)
                mods[name].down_proj.copy_(down)
    return ref


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_quantized_model_equals_the_float_model_of_its_dequantized_weights(scheme):
    model = make_model(CFG)
    q = copy.deepcopy(model)
    names = quantize_weight_only(q, scheme[0], symmetric=scheme[1])
    assert len(names["linear"]) == CFG.num_layers * 7 and len(names["experts"]) == CFG.num_layers
    assert type(q.model.layers[0].mlp.router.gate) is type(model.model.layers[0].mlp.router.gate)  # float
    assert type(q.lm_head) is type(model.lm_head) and q.model.embed_tokens.weight.dtype == torch.float32
    ref = _dequantized_float_model(model, q)
    ids = torch.randint(0, CFG.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, float_logits = q(ids).logits, ref(ids).logits, model(ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (got - float_logits).abs().max() > 1e-4  # the weights really are quantized
    prompts = [[1, 5, 9], [7, 3]]
    for batch in (prompts[:1], prompts):  # one token per step (no sort) and several
        a = generate(q, batch, max_new_tokens=6, sampling=Sampling(), stop_ids=[]).tokens
        b = generate(ref, batch, max_new_tokens=6, sampling=Sampling(), stop_ids=[]).tokens
        assert a == b


def test_experts_module_is_a_drop_in_for_swiglu_experts():
    torch.manual_seed(0)
    experts = SwiGLUExperts(6, 64, 32)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    for scheme in SCHEMES:
        q = WOExperts.from_experts(experts, scheme[0], symmetric=scheme[1])
        ref = copy.deepcopy(experts)
        with torch.no_grad():
            ref.gate_up_proj.copy_(q.dequantized()[0])
            ref.down_proj.copy_(q.dequantized()[1])
        for T in (1, 5):
            x = torch.randn(T, 64)
            e = torch.stack([torch.randperm(6)[:3] for _ in range(T)])
            weights = torch.rand(T, 3)
            assert torch.allclose(q(x, e, weights), ref(x, e, weights, backend="reference"), atol=1e-5)
        assert scheme[0] in repr(q) and "num_experts=6" in repr(q)


# ---- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("wo")
    model = make_model(CFG)
    out = {}
    for scheme, sym in SCHEMES:
        q = copy.deepcopy(model)
        quantize_weight_only(q, scheme, symmetric=sym)
        name = f"{scheme}-{'sym' if sym else 'asym'}"
        save_quantized(q, root / name)
        out[name] = (root / name, q)
    save_pretrained(model, root / "float")
    return root, out


@pytest.mark.parametrize("name", ["int8-wo-sym", "int4-wo-sym", "int4-wo-asym"])
def test_save_then_load_is_bit_exact(saved, name):
    directory, q = saved[1][name]
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "moge-weight-only" and qc["scheme"] == name.rsplit("-", 1)[0]
    if qc["scheme"] == "int4-wo":
        assert qc["weights"]["group_size"] == 32 and qc["weights"]["symmetric"] == name.endswith("-sym")
    loaded = load_pretrained(directory)
    want, got = q.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    ids = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def _rewrite(src, dst, tensors=None, config=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    data = load_file(src / "model.safetensors")
    if tensors:
        tensors(data)
    save_file(data, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_corrupted_or_mismatched_checkpoints_are_refused_naming_the_problem(saved, tmp_path):
    src = saved[1]["int4-wo-sym"][0]
    key = "model.layers.1.mlp.experts.down_scale"

    def nan_scale(t):
        t[key][0, 0, 0] = float("nan")

    with pytest.raises(CheckpointError, match=f"{key} holds the scale nan"):
        load_quantized(_rewrite(src, tmp_path / "nan", tensors=nan_scale))

    def zero_scale(t):
        t[key][0, 0, 0] = 0.0

    with pytest.raises(CheckpointError, match=f"{key} holds the scale 0.0; scales must be finite and nonzero"):
        load_quantized(_rewrite(src, tmp_path / "zero", tensors=zero_scale))

    def as_int8(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"].view(torch.int8)

    with pytest.raises(CheckpointError, match=r"q_proj.weight: expected dtype torch.uint8, found torch.int8"):
        load_quantized(_rewrite(src, tmp_path / "dtype", tensors=as_int8))

    def group_64(qc):
        qc["weights"]["group_size"] = 64

    with pytest.raises(CheckpointError, match=r"group_size=64 is invalid: it does not divide .*intermediate_size=32"):
        load_quantized(_rewrite(src, tmp_path / "g64", config=group_64))

    def scheme(qc):
        qc["scheme"] = "int3-wo"

    with pytest.raises(CheckpointError, match=r"quantization_config.scheme='int3-wo' is not supported"):
        load_quantized(_rewrite(src, tmp_path / "scheme", config=scheme))

    def int8_config(qc):  # the config says int8, the file holds packed int4
        qc["scheme"] = "int8-wo"
        qc["weights"] = {"dtype": "int8", "granularity": "per_output_channel"}

    with pytest.raises(CheckpointError, match=r"q_proj.weight: expected shape \[64, 64\], found \[64, 32\]"):
        load_quantized(_rewrite(src, tmp_path / "int8", config=int8_config))
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path / "cut")


def test_a_model_with_two_schemes_is_not_saved(tmp_path):
    model = make_model(CFG)
    quantize_model(model)
    model.model.layers[0].self_attn.q_proj = WOLinear(64, 64, scheme="int8-wo")
    with pytest.raises(ValueError, match="mixes quantization schemes"):
        save_quantized(model, tmp_path / "q")


# ---- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_checkpoint(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("wo-cli")
    (root / "data").symlink_to(corpus / "data")
    cfg = CFG.replace(vocab_size=300, eos_token_id=2, pad_token_id=0, bos_token_id=2)
    save_pretrained(make_model(cfg), root / "ckpt")
    return root


def test_cli_quantize_weight_only_then_generate(corpus_checkpoint, tmp_path, capsys):
    from moge.cli import main

    root = corpus_checkpoint
    base = ["quantize", "--model", str(root / "ckpt"), "--data", str(root / "data"), "--seq-len", "16",
            "--eval-windows", "4"]
    assert main([*base, "--out", str(tmp_path / "q4"), "--scheme", "int4-wo", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ev = result["eval"]
    assert result["scheme"] == "int4-wo" and result["group_size"] == 32 and result["kernel"] == "cpp"
    assert ev["tokens"] > 0 and abs(ev["ppl_relative_change"]) < 0.03
    assert len(ev["expert_agreement"]) == CFG.num_layers and all(0.5 < a <= 1 for a in ev["expert_agreement"])
    assert result["weight_bytes_after"] < result["weight_bytes_before"]
    assert isinstance(load_pretrained(tmp_path / "q4").model.layers[0].mlp.experts, WOExperts)
    assert main(["generate", "--model", str(tmp_path / "q4"), "--prompt", "thou art", "--max-new-tokens", "3",
                 "--json"]) == 0
    assert 1 <= len(json.loads(capsys.readouterr().out)["completions"][0]["tokens"]) <= 3
    assert main([*base, "--out", str(tmp_path / "q8"), "--scheme", "int8-wo"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "x"), "--scheme", "int2"]) == 2
    assert "--scheme='int2' is invalid: choose one of w8a8, int8-wo, int4-wo" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--scheme", "int4-wo", "--group-size", "48"]) == 2
    assert "group_size=48 is invalid" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--group-size", "64"]) == 2
    assert "--group-size applies to --scheme int4-wo only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
