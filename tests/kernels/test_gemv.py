"""The few-row CPU kernel (moge.kernels.gemv): equal to F.linear, its fallback, its build errors,
and the float model's decode through it (eager and compiled) equal to the torch path."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moge.kernels import gemv
from moge.nn.experts import SwiGLUExperts, linear
from moge.nn.model import KVCache
from moge.quant import WOLinear
from models import make_model, tiny_config


@pytest.fixture(autouse=True)
def _default_kernel():
    gemv.set_kernel("auto")
    yield
    gemv.set_kernel("auto")


def test_the_cpp_kernel_builds_here():
    assert gemv.kernel() == "cpp"  # this machine has a compiler: the tests below cover the C++ kernel
    assert gemv.available()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 13), n=st.integers(1, 27), k=st.integers(1, 70), experts=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_dense_kernel_equals_linear_per_row(rows, n, k, experts, dtype, seed):
    """Any rows, N not a multiple of the 8-channel block, K with vector tails, rows in runs of
    expert ids: each row equals F.linear with its expert's weight, up to fp32 summation order."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(experts, n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen)
    ids = torch.randint(0, experts, (rows,), generator=gen).sort().values.flip(0)
    got = gemv.gemv(x, w, None, ids)
    want = torch.stack([F.linear(x[r], w[int(e)].float()) for r, e in enumerate(ids)])
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 2e-5 * (want.abs().max().item() + 1) * k ** 0.5
    one = gemv.gemv(x, w[0])  # a plain [N, K] matrix: every row on it
    assert torch.allclose(one, F.linear(x, w[0].float()), rtol=1e-5, atol=1e-4)


def test_bad_arguments_are_refused_by_the_kernel():
    x, w = torch.randn(2, 8), torch.randn(3, 4, 8)
    with pytest.raises(RuntimeError, match=r"expert id 3 out of range \[0, 3\)"):
        gemv.gemv(x, w, None, torch.tensor([3, 3]))
    with pytest.raises(RuntimeError, match="w has K=8 but x has K=5"):
        gemv.gemv(torch.randn(2, 5), w)
    with pytest.raises(RuntimeError, match="float weights take no scale"):
        gemv.gemv(x, w, torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        gemv.gemv(x, w.to(torch.int8))


def test_linear_and_experts_take_the_kernel_only_without_gradients():
    torch.manual_seed(0)
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(3, 32)
    y = linear(x, w)  # a gradient is needed: torch's path, differentiable
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert torch.allclose(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    experts = SwiGLUExperts(8, 32, 16)
    x_TD = torch.randn(5, 32, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(8)[:2] for _ in range(5)])
    weights_TK = torch.rand(5, 2)
    out = experts(x_TD, experts_TK, weights_TK)
    out.sum().backward()
    assert x_TD.grad is not None and experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_through_the_kernel_equal_the_reference(tokens, dtype):
    torch.manual_seed(tokens)
    experts = SwiGLUExperts(16, 32, 16).to(dtype)
    x = torch.randn(tokens, 32).to(dtype)
    experts_TK = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])
    weights_TK = torch.rand(tokens, 4)
    with torch.no_grad():
        got = experts(x, experts_TK, weights_TK)
        ref = experts(x.float(), experts_TK, weights_TK, backend="reference") if dtype == torch.float32 else \
            SwiGLUExperts(16, 32, 16).requires_grad_(False)
        if dtype == torch.bfloat16:
            ref.gate_up_proj.copy_(experts.gate_up_proj.float())
            ref.down_proj.copy_(experts.down_proj.float())
            ref = ref(x.float(), experts_TK, weights_TK, backend="reference")
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_model_decode_with_and_without_the_kernel_agree():
    cfg = tiny_config(vocab_size=61, hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=64)
    model = make_model(cfg)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))

    def run():
        cache = KVCache.allocate(cfg, 2, 12, torch.float32)
        with torch.inference_mode():
            first = model(ids, cache=cache).logits
            step = model(ids[:, -1:], cache=cache).logits
        return first, step

    got = run()
    gemv.set_kernel("torch")
    want = run()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_ops_trace_under_torch_compile():
    w = torch.randn(4, 24, 32)
    ids = torch.tensor([1, 1, 3])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x):
        return gemv.gemv(torch.relu(x), w, None, ids) * 2

    x = torch.randn(3, 32)
    assert torch.allclose(f(x), gemv.gemv(torch.relu(x), w, None, ids) * 2)


def test_a_failed_build_falls_back_to_torch_with_one_warning_naming_why(monkeypatch):
    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setattr(gemv, "_try_build", lambda: "no C++ compiler found (looked for 'c++' on PATH)")
    lin = WOLinear.from_linear(torch.nn.Linear(64, 5), "int4-wo")
    x = torch.randn(3, 64)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ kernel is unavailable \(no C\+\+ compiler found"):
        y = lin(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        lin(x)
        with torch.no_grad():
            assert torch.allclose(linear(x, lin.dequantized_weight()), F.linear(x, lin.dequantized_weight()))
    assert torch.allclose(y, F.linear(x, lin.dequantized_weight(), lin.bias), atol=1e-5)
    gemv.set_kernel("cpp")
    with pytest.raises(RuntimeError, match="C\\+\\+ kernel is unavailable: no C\\+\\+ compiler"):
        lin(x)


def test_a_bad_kernel_choice_is_refused():
    from moge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gemv kernel='fast' is invalid: choose one of \('auto', 'cpp', 'torch'\)"):
        gemv.set_kernel("fast")


def test_a_build_error_is_reported_by_its_compiler_line(monkeypatch):
    import torch.utils.cpp_extension as ext

    def failing_load(**_kwargs):
        raise RuntimeError("Error building extension 'moge_gemv': [1/2] c++ -c gemv.cpp\n"
                           "FAILED: gemv.o\ngemv.cpp:3:10: fatal error: immintrin.h: No such file\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(ext, "load", failing_load)
    assert gemv._try_build() == ("building it failed: RuntimeError: gemv.cpp:3:10: fatal error: immintrin.h: "
                                 "No such file")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert gemv._try_build() == "no C++ compiler found (looked for 'no-such-compiler-here' on PATH)"
