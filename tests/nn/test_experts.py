"""Every expert backend equals the reference written from the paper's formula, forward and backward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moge.errors import ConfigError
from moge.nn.experts import SwiGLUExperts, combine, linear, permute, reference_experts

BACKENDS = ["loop", "grouped_mm"]


def _run(experts, x, ids, w, backend, grad_out):
    experts.zero_grad()
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = experts(x, ids, w, backend=backend)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


@given(t=st.integers(1, 24), e=st.sampled_from([1, 3, 8]), k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_backends_equal_reference_forward_and_backward(t, e, k, seed):
    k = min(k, e)
    torch.manual_seed(seed)
    experts = SwiGLUExperts(e, 8, 12)
    x = torch.randn(t, 8)
    ids = torch.rand(t, e).argsort(-1)[:, :k]
    w = torch.rand(t, k)
    g = torch.randn(t, 8)
    ref = _run(experts, x, ids, w, "reference", g)
    for backend in BACKENDS:
        got = _run(experts, x, ids, w, backend, g)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_experts_with_no_tokens_get_zero_gradient_and_results_still_match():
    torch.manual_seed(0)
    experts = SwiGLUExperts(6, 8, 4)
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, 2]] * 5)  # experts 1, 3, 4, 5 receive nothing
    w = torch.rand(5, 2)
    g = torch.randn(5, 8)
    ref = _run(experts, x, ids, w, "reference", g)
    for backend in BACKENDS:
        got = _run(experts, x, ids, w, backend, g)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.all(got[3][[1, 3, 4, 5]] == 0)


def test_reference_is_the_spec_formula_per_token():
    torch.manual_seed(1)
    experts = SwiGLUExperts(4, 8, 4)
    x = torch.randn(3, 8)
    ids = torch.tensor([[0, 3], [1, 2], [3, 0]])
    w = torch.rand(3, 2)
    y = reference_experts(x, ids, w, experts.gate_up_proj, experts.down_proj)
    for t in range(3):
        acc = torch.zeros(8)
        for j in range(2):
            e = ids[t, j]
            gate, up = experts.gate_up_proj[e][:4], experts.gate_up_proj[e][4:]
            h = torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])
            acc += w[t, j] * (experts.down_proj[e] @ h)
        torch.testing.assert_close(y[t], acc, atol=1e-6, rtol=1e-6)


def test_permute_then_combine_is_identity_for_unit_weights():
    ids = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    order, token, counts = permute(ids, 3)
    assert counts.tolist() == [2, 3, 3]
    assert torch.equal(ids.reshape(-1)[order], torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]))
    x = torch.arange(4.0).unsqueeze(-1)
    y = combine(x[token], order, torch.full((4, 2), 0.5))
    torch.testing.assert_close(y, x)


def test_combine_is_deterministic_bitwise():
    torch.manual_seed(0)
    experts = SwiGLUExperts(16, 32, 16)
    x = torch.randn(64, 32)
    ids = torch.rand(64, 16).argsort(-1)[:, :4]
    w = torch.rand(64, 4)
    first = experts(x, ids, w, backend="loop")
    for _ in range(3):
        assert torch.equal(experts(x, ids, w, backend="loop"), first)


def test_requested_grouped_mm_on_unaligned_shapes_raises_instead_of_falling_back():
    x = torch.randn(7, 6)  # hidden_size=6 in fp32: 24-byte rows, not 16-byte aligned
    ids = torch.randint(0, 4, (7, 1))
    w = torch.ones(7, 1)
    experts = SwiGLUExperts(4, 6, 5, backend="grouped_mm")
    with pytest.raises(ConfigError, match=r"backend='grouped_mm' cannot run here: .*hidden_size=6 .*"
                                          r"torch.float32.*backend='auto'.*backend='loop'"):
        experts(x, ids, w)
    with pytest.raises(ConfigError, match="backend='grouped_mm'"):
        SwiGLUExperts(4, 6, 5)(x, ids, w, backend="grouped_mm")
    auto = SwiGLUExperts(4, 6, 5)  # only `auto` chooses: it picks a kernel that runs
    assert auto.resolve_backend(x) == "loop"
    torch.testing.assert_close(auto(x, ids, w), auto(x, ids, w, backend="reference"))


def test_bad_backend_name_is_rejected():
    experts = SwiGLUExperts(2, 8, 4)
    with pytest.raises(ValueError, match="backend='fast'"):
        experts(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), backend="fast")


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_inference_arrangements_equal_reference(tokens, threads, k):
    """Without gradients the CPU kernels rearrange the products (one-token path, weight @ x.T
    grouped_mm, few-row `linear`); the numbers stay the reference's. Any number of rows, also
    one whose fp32 row of R values is not a multiple of 16 bytes (an expert-parallel rank
    receives any count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(tokens)
        experts = SwiGLUExperts(8, 32, 16)
        x = torch.randn(tokens, 32)
        ids = torch.rand(tokens, 8).argsort(-1)[:, :k]
        w = torch.rand(tokens, k)
        with torch.no_grad():
            ref = experts(x, ids, w, backend="reference")
            for backend in (None, "loop", "grouped_mm"):
                torch.testing.assert_close(experts(x, ids, w, backend=backend), ref, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 2, 5, 200])
def test_few_row_linear_equals_f_linear(rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(1024, 256), torch.randn(1024)  # large enough to double a single row
    x = torch.randn(1, rows, 256)
    for b in (None, bias):
        got = linear(x, weight, b)
        assert got.shape == (1, rows, 1024)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), atol=1e-4, rtol=1e-5)


def test_compiled_grouped_mm_op_passes_torch_opcheck():
    """`moge::grouped_mm` (grouped_mm as torch.compile sees it): schema, shape-only fake kernel and
    hand-written backward checked by torch's own op tests, empty groups included."""
    from moge.nn.experts import _grouped_mm_op

    torch.manual_seed(0)
    a = torch.randn(7, 8, requires_grad=True)
    b = torch.randn(4, 16, 8).transpose(-2, -1).requires_grad_()
    offs = torch.tensor([2, 2, 5, 7], dtype=torch.int32)  # expert 1 gets no rows
    torch.library.opcheck(_grouped_mm_op, (a, b, offs))
    y = _grouped_mm_op(a, b, offs)
    torch.testing.assert_close(y, torch.nn.functional.grouped_mm(a, b, offs=offs))
    y.backward(torch.ones_like(y))
    assert torch.all(b.grad[1] == 0)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("backend", [None, "grouped_mm", "loop"])
def test_no_rows_give_an_empty_output(backend, grad):
    """An expert-parallel rank can receive no token at all (top-K sends a token's every slot to
    other ranks); grouped_mm rejects empty operands, so the kernels return [0, D] themselves, and
    the weights still get a (zero) gradient."""
    experts = SwiGLUExperts(8, 32, 16)
    x = torch.randn(0, 32, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = experts(x, torch.zeros(0, 1, dtype=torch.long), torch.ones(0, 1), backend=backend)
        assert y.shape == (0, 32)
        if grad:
            y.sum().backward()
            assert experts.gate_up_proj.grad is not None and not experts.gate_up_proj.grad.any()
