"""Routed SwiGLU experts: one stacked weight layout, several compute backends with equal numbers.

Weights: `gate_up_proj` [E, 2F, D] (gate rows first, then up rows) and `down_proj` [E, D, F],
i.e. the released per-expert `gate_proj`/`up_proj`/`down_proj` matrices stacked. An expert is
down(silu(gate(x)) * up(x)), no biases.

The path of a batch: permute token slots so each expert's rows are contiguous, run the experts on
their rows, then combine: scale by the routing weight and sum each token's K rows back in token
order. No atomics anywhere, so results are bit-for-bit repeatable.

Backends (same weights, same results):
  grouped_mm  torch.nn.functional.grouped_mm over the sorted rows (needs 16-byte aligned rows)
  loop        a Python loop over the experts that received tokens, hand-written backward
  reference   straight from the paper's formula: every expert on every token, y = sum_i G_i * E_i(x)

Host syncs (a device -> host copy stalls an accelerator's queue and breaks a torch.compile graph):
  grouped_mm  none: the per-expert row counts stay on the device as grouped_mm's offsets. Under
              torch.compile it runs as the opaque op `moge::grouped_mm` (see `grouped_mm`).
  loop        one, by nature: a Python loop over experts needs their row counts on the host
              (`counts_E.tolist()`). Cheap in eager CPU use, where it is the fastest kernel for
              large batches; a graph break under torch.compile.
  reference   none (every expert on every token).
  `auto` therefore picks grouped_mm on accelerators and whenever torch.compile is tracing; the
  eager CPU shortcut for one token (its expert ids as a Python list) is skipped under compile.

Decoding on CPU (no gradient, few rows per expert): `auto` runs the experts through the C++ gemv
kernel (moge.kernels.gemv) instead, one call per projection for every row, each naming its expert;
it syncs nothing and is one opaque op under torch.compile. The paths above remain for training,
large batches, other devices and machines where the kernel cannot be built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.kernels import gemv as _gemv
from moge.nn.routing import expert_counts


def permute(experts_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the T*K token slots by expert (stable, so ties keep token order).

    Returns (order_R, token_R, counts_E): slot indices in expert order, the token each sorted
    row came from, and how many rows each expert received (R = T*K).
    """
    flat_R = experts_TK.reshape(-1)
    order_R = torch.argsort(flat_R, stable=True)
    counts_E = expert_counts(experts_TK, num_experts)
    return order_R, order_R // experts_TK.shape[-1], counts_E


def expert_slots(experts_TK: Tensor, *rows_T: Tensor) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Token slots as rows for a kernel that takes one expert id per row (moge.kernels.gemv):
    (expert_R, order_R, each of `rows_T` gathered per slot). One token keeps its K slots in routing
    order (order_R None; its rows are views); a batch's slots are sorted by expert (stable), so each
    expert's weights stream once, and order_R takes the outputs back (`combine`)."""
    T, K = experts_TK.shape
    if T == 1:
        return experts_TK[0].long(), None, [t.expand(K, *t.shape[1:]) for t in rows_T]
    order_R = torch.argsort(experts_TK.reshape(-1), stable=True)
    token_R = order_R // K
    expert_R = experts_TK.reshape(-1).index_select(0, order_R).long()
    return expert_R, order_R, [t.index_select(0, token_R) for t in rows_T]


def combine(out_RD: Tensor, order_R: Tensor, weights_TK: Tensor) -> Tensor:
    """Weighted sum of each token's K expert outputs, back in token order (deterministic)."""
    T, K = weights_TK.shape
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    out_TKD = out_RD.index_select(0, inverse_R).view(T, K, out_RD.shape[-1])
    y_TD = torch.bmm(weights_TK.to(out_RD.dtype).unsqueeze(1), out_TKD).squeeze(1)
    return y_TD


def grouped_mm_supported(x: Tensor, hidden: int, ffn: int) -> bool:
    """grouped_mm exists in this torch and the row strides are 16-byte multiples."""
    return grouped_mm_unsupported_reason(x, hidden, ffn) is None


def grouped_mm_unsupported_reason(x: Tensor, hidden: int, ffn: int) -> str | None:
    """Why grouped_mm cannot run these shapes (None when it can)."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    size = x.element_size()
    for name, width in (("hidden_size", hidden), ("expert_intermediate_size", ffn)):
        if (width * size) % 16:
            return (f"its row stride must be a multiple of 16 bytes, and {name}={width} in {x.dtype} "
                    f"({size} bytes each) gives {width * size}")
    return None


def check_backend_runs(backend: str, x: Tensor, hidden: int, ffn: int) -> str:
    """An explicitly requested kernel runs as asked, or raises naming why and what would run."""
    reason = grouped_mm_unsupported_reason(x, hidden, ffn) if backend == "grouped_mm" else None
    if reason:
        raise ConfigError(f"backend='grouped_mm' cannot run here: {reason}; use backend='auto' (picks a kernel "
                          "that runs) or backend='loop'")
    return backend


# Up to this many rows, `linear` computes weight @ x.T on CPU (measured with D=512 weights on 2
# threads: 1.2-3x faster than x @ weight.T from 2 to 32 rows, even at 128, behind from 256).
FEW_ROWS = 128
# One row is worth doubling from this weight size on (0.5 MB fp32). Measured on 2 threads with the
# moge-small preset: a batch-1 decode step 1.25x faster than without doubling; 0.25 MB (the k/v
# projections) and 1 MB thresholds were both slower than this one.
DOUBLE_ROW_MIN_WEIGHT = 128 * 1024
GEMV_DTYPES = (torch.float32, torch.bfloat16)


def gemv_runs(x: Tensor, *weights: Tensor, rows: int) -> bool:
    """Whether the C++ few-row kernel (moge.kernels.gemv) computes these products: CPU tensors,
    float32/bfloat16 weights, at most its MAX_ROWS rows per matrix, no gradient needed (the kernel
    has no backward), and the kernel built here. Under torch.compile it is an opaque op."""
    return (x.device.type == "cpu" and 0 < rows <= _gemv.MAX_ROWS and all(w.dtype in GEMV_DTYPES for w in weights)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
            and _gemv.available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, arranged for the few-row products of decoding on CPU.

    Up to the gemv kernel's MAX_ROWS rows, at inference, the C++ kernel streams the weight on
    every thread (moge.kernels.gemv; eager and under torch.compile). Without it, MKL computes
    x @ weight.T for a handful of rows on one core, while weight @ x.T (the same sums, in another
    order) splits the weight's rows over the threads and streams it 1.2-3x faster; one row takes
    MKL's single-threaded matrix-vector path either way, so for weights of DOUBLE_ROW_MIN_WEIGHT
    elements and more it is doubled into two rows. With one thread, on other devices, for many
    rows and under torch.compile without the kernel this is plain F.linear."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if gemv_runs(x, weight, rows=rows):
        y = _gemv.gemv(x.reshape(rows, x.shape[-1]), weight)
        if bias is not None:
            y = y.add_(bias)
        return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    if x.device.type != "cpu" or not 0 < rows <= FEW_ROWS or torch.get_num_threads() < 2:
        return F.linear(x, weight, bias)
    if rows == 1 and weight.numel() < DOUBLE_ROW_MIN_WEIGHT:
        return F.linear(x, weight, bias)
    x_MK = x.reshape(rows, x.shape[-1])
    if rows == 1:
        x_MK = torch.cat([x_MK, x_MK])
    if bias is None:
        y_NM = torch.mm(weight, x_MK.t())
    else:
        y_NM = torch.addmm(bias.unsqueeze(1), weight, x_MK.t())
    if rows == 1:  # a strided view of the first column: copying it would cost more than it saves
        return y_NM[:, 0].view(*x.shape[:-1], weight.shape[0])
    return y_NM.t().contiguous().view(*x.shape[:-1], weight.shape[0])


# CPU crossover between the grouped_mm and loop kernels, in mean rows per expert (measured with
# D=512, F=256, 64 experts on 1-2 threads: grouped_mm ahead up to 32 rows, loop ahead from 64).
GROUPED_MM_MAX_ROWS_PER_EXPERT = 48


class SwiGLUExperts(nn.Module):
    """E routed experts stored stacked; `forward(x_TD, experts_TK, weights_TK)` -> y_TD."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default per expert (kaiming uniform, a=sqrt(5)).
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def resolve_backend(self, x: Tensor, rows: int | None = None) -> str:
        """The kernel for `rows` token slots. `auto`: grouped_mm on accelerators; on CPU grouped_mm
        while experts get few rows each (it is one C++ loop of matmuls, less Python overhead), the
        loop kernel from GROUPED_MM_MAX_ROWS_PER_EXPERT rows per expert on (its gather-in-cache
        and hand-written backward win there; measurements in docs/benchmarks.md). A requested
        kernel runs or raises ConfigError: only `auto` chooses.
        When no gradient is needed on eager CPU (generation), `forward` also takes shortcuts with
        the same sums: one token skips the permutation, and grouped_mm runs as weight @ x.T.
        Under torch.compile `auto` is grouped_mm: the loop kernel syncs (see the module docstring)."""
        if self.backend != "auto":
            return check_backend_runs(self.backend, x, self.hidden_size, self.intermediate_size)
        if not grouped_mm_supported(x, self.hidden_size, self.intermediate_size):
            return "loop"
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return "grouped_mm"
        if rows is None:
            return "loop"
        return "grouped_mm" if rows < GROUPED_MM_MAX_ROWS_PER_EXPERT * self.num_experts else "loop"

    def forward(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        chosen = backend or self.backend
        if backend is None:
            backend = self.resolve_backend(x_TD, experts_TK.numel())
        else:
            check_backend_runs(backend, x_TD, self.hidden_size, self.intermediate_size)
        if backend == "reference":
            return reference_experts(x_TD, experts_TK, weights_TK, self.gate_up_proj, self.down_proj)
        if x_TD.shape[0] == 0 and backend == "grouped_mm":  # an expert-parallel rank that received nothing
            return _no_rows(x_TD, self.gate_up_proj, self.down_proj)
        # CPU without gradients, few rows per expert (decoding): the gemv kernel, one call per
        # projection for all rows (eager and under torch.compile)
        R = experts_TK.numel()
        if chosen == "auto" and gemv_runs(x_TD, self.gate_up_proj, self.down_proj, rows=R // self.num_experts + 1):
            return _gemv_experts(x_TD, experts_TK, weights_TK, self.gate_up_proj, self.down_proj)
        # eager CPU without gradients: rearranged kernels (same sums) that stream weights faster
        inference = x_TD.device.type == "cpu" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, weights_TK, self.gate_up_proj,
                                                                       self.down_proj)))
        if inference and x_TD.shape[0] == 1 and chosen == "auto":
            return _one_token_experts(x_TD.to(self.gate_up_proj.dtype), experts_TK[0].tolist(), weights_TK[0],
                                      self.gate_up_proj, self.down_proj)
        order_R, token_R, counts_E = permute(experts_TK, self.num_experts)
        if backend == "loop":
            weight_R = weights_TK.reshape(-1).index_select(0, order_R)
            x_TD = x_TD.to(self.gate_up_proj.dtype)
            return _LoopExperts.apply(x_TD, token_R, weight_R, counts_E.tolist(), self.gate_up_proj, self.down_proj)
        if backend == "grouped_mm":
            x_RD = x_TD.index_select(0, token_R)
            if inference and (x_RD.shape[0] * x_RD.element_size()) % 16 == 0:  # its outputs' rows are R long
                out_RD = _grouped_mm_experts_weight_left(x_RD, counts_E, self.gate_up_proj, self.down_proj)
            else:
                out_RD = _grouped_mm_experts(x_RD, counts_E, self.gate_up_proj, self.down_proj)
            return combine(out_RD, order_R, weights_TK)
        raise ValueError(f"backend={backend!r} is invalid: choose auto, grouped_mm, loop or reference")


def _no_rows(x_0D: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor) -> Tensor:
    """The [0, D] output for no rows (grouped_mm rejects empty operands). When training it stays
    connected to the weights, so they get a zero gradient like on any rank that has rows."""
    out = x_0D.to(gate_up_E2FD.dtype)
    if torch.is_grad_enabled() and (gate_up_E2FD.requires_grad or down_EDF.requires_grad):
        out = out + (gate_up_E2FD.sum() + down_EDF.sum()) * 0
    return out


def _swiglu(h_R2F: Tensor) -> Tensor:
    gate, up = h_R2F.chunk(2, dim=-1)
    return F.silu(gate) * up


class _LoopExperts(torch.autograd.Function):
    """The `loop` kernel: per expert that received rows, gather its tokens, run the SwiGLU, scale
    by the routing weight and add into the output, with a hand-written backward.

    Gathering and scattering inside the loop keeps each expert's rows in cache between the copy
    and the matmul (measured about 30% faster than a global permute at 4096 tokens). The adds are
    deterministic: each call adds each token at most once (a token's experts are distinct) and the
    experts always come in the same order. Weight gradients are written straight into one [E, ...]
    buffer: autograd over a per-expert loop would index the stacked weights per expert (a full-size
    gradient each) or unbind them (an extra full-size copy to stack the gradients).
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_R: Tensor, weight_R: Tensor, counts: list[int], gate_up_E2FD: Tensor,
                down_EDF: Tensor) -> Tensor:
        training = any(ctx.needs_input_grad)
        R, two_f = token_R.shape[0], gate_up_E2FD.shape[1]
        # Keep the gate/up output and the expert output for backward only when training; at
        # inference per-expert temporaries stay in cache instead of streaming through memory.
        h_R2F = x_TD.new_empty(R, two_f) if training else None
        out_RD = x_TD.new_empty(R, x_TD.shape[1]) if training else None
        y_TD = torch.zeros_like(x_TD)
        w_R = weight_R.to(x_TD.dtype)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                tokens = token_R[rows]
                x_nD = x_TD.index_select(0, tokens)
                if training:
                    h = torch.mm(x_nD, gate_up_E2FD[e].t(), out=h_R2F[rows])
                    out = torch.mm(_swiglu(h), down_EDF[e].t(), out=out_RD[rows])
                    y_TD.index_add_(0, tokens, out * w_R[rows, None])
                else:
                    out = linear(_swiglu(linear(x_nD, gate_up_E2FD[e])), down_EDF[e])
                    y_TD.index_add_(0, tokens, out.mul_(w_R[rows, None]))
                start += n
        ctx.counts = counts
        if training:
            ctx.save_for_backward(x_TD, token_R, weight_R, h_R2F, out_RD, gate_up_E2FD, down_EDF)
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_TD: Tensor):
        x_TD, token_R, weight_R, h_R2F, out_RD, gate_up_E2FD, down_EDF = ctx.saved_tensors
        need_x, _, need_w, _, need_gu, need_dn = ctx.needs_input_grad
        grad_y_TD = grad_y_TD.contiguous()
        grad_x = torch.zeros_like(x_TD) if need_x else None
        grad_w = torch.empty_like(weight_R) if need_w else None
        grad_gu = torch.empty_like(gate_up_E2FD) if need_gu else None
        grad_dn = torch.empty_like(down_EDF) if need_dn else None
        w_R = weight_R.to(x_TD.dtype)
        f = h_R2F.shape[1] // 2
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for g in (grad_gu, grad_dn):
                    if g is not None:
                        g[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            tokens = token_R[rows]
            g_y = grad_y_TD.index_select(0, tokens)
            if need_w:
                grad_w[rows] = (g_y * out_RD[rows]).sum(-1)
            g_out = g_y * w_R[rows, None]
            gate, up = h_R2F[rows, :f], h_R2F[rows, f:]
            sig = torch.sigmoid(gate)
            silu = gate * sig
            if need_dn:
                torch.mm(g_out.t(), silu * up, out=grad_dn[e])
            g_act = torch.mm(g_out, down_EDF[e])
            g_h = torch.empty_like(h_R2F[rows])
            torch.mul(g_act * up, sig * (1 + gate * (1 - sig)), out=g_h[:, :f])
            torch.mul(g_act, silu, out=g_h[:, f:])
            if need_gu:
                torch.mm(g_h.t(), x_TD.index_select(0, tokens), out=grad_gu[e])
            if need_x:
                grad_x.index_add_(0, tokens, torch.mm(g_h, gate_up_E2FD[e]))
        return grad_x, None, grad_w, None, grad_gu, grad_dn


@torch.library.custom_op("moge::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return F.grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if a.dim() == 2 and b.dim() == 3:  # rows grouped: [R, K] x [E, K, N] -> [R, N]
        return a.new_empty(a.shape[0], b.shape[-1])
    if a.dim() == 2 and b.dim() == 2:  # reduction grouped: [K, R] x [R, N] -> [E, K, N]
        return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])
    raise ValueError(f"moge::grouped_mm supports [R, K] x [E, K, N] and [K, R] x [R, N], got "
                     f"{tuple(a.shape)} x {tuple(b.shape)}")


def _grouped_mm_setup(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad_RN: Tensor):
    a_RK, b_EKN, offs = ctx.saved_tensors
    grad_RN = grad_RN.contiguous()  # grouped_mm rejects the stride-0 gradients of a sum()
    grad_a = _grouped_mm_op(grad_RN, b_EKN.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_op(a_RK.t(), grad_RN, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(a_RK: Tensor, b_EKN: Tensor, offs_E: Tensor) -> Tensor:
    """`F.grouped_mm(a_RK, b_EKN, offs=offs_E)`: each expert's rows of a times its matrix of b.

    Eager calls go straight to torch. Under torch.compile it is the custom op `moge::grouped_mm`:
    torch 2.13's shape-only (fake) kernel for grouped_mm accepts bfloat16 alone, while the CPU and
    CUDA kernels run float32 too, so tracing a float32 model would fail. The op is opaque to the
    compiler, with a shape-only fake and the backward written out (two more grouped products)."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(a_RK, b_EKN, offs_E)
    return F.grouped_mm(a_RK, b_EKN, offs=offs_E)


def _grouped_mm_experts(x_RD: Tensor, counts_E: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor) -> Tensor:
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_R2F = grouped_mm(x_RD, gate_up_E2FD.transpose(-2, -1), offs_E)
    return grouped_mm(_swiglu(h_R2F), down_EDF.transpose(-2, -1), offs_E)


def _grouped_mm_experts_weight_left(x_RD: Tensor, counts_E: Tensor, gate_up_E2FD: Tensor,
                                    down_EDF: Tensor) -> Tensor:
    """The grouped_mm kernel arranged as weight @ x.T (see `linear`), for CPU inference: with a
    few rows per expert it streams the weights faster (1.4x at 16 tokens, 1.15x at 128, measured
    with 64 experts, D=512, F=256 on 2 threads). Its outputs are [2F, R] and [D, R], so R rows must
    make 16 bytes (grouped_mm's stride rule); the caller checks. Returns out_RD (a transposed view)."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_2FR = F.grouped_mm(gate_up_E2FD, x_RD.t(), offs=offs_E)
    f = h_2FR.shape[0] // 2
    # rows-major again, so the second product reads it as x.T like the first (MKL's fast layout)
    act_RF = (F.silu(h_2FR[:f]) * h_2FR[f:]).t().contiguous()
    return F.grouped_mm(down_EDF, act_RF.t(), offs=offs_E).t()


def _gemv_experts(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, gate_up_E2FD: Tensor,
                  down_EDF: Tensor) -> Tensor:
    """The experts through the gemv kernel: each projection is one call over every token slot,
    each row naming its expert (`expert_slots`)."""
    f = gate_up_E2FD.shape[1] // 2
    expert_R, order_R, (x_RD,) = expert_slots(experts_TK, x_TD.float())
    h_R2F = _gemv.gemv(x_RD, gate_up_E2FD, None, expert_R)
    out_RD = _gemv.gemv(F.silu(h_R2F[:, :f]) * h_R2F[:, f:], down_EDF, None, expert_R)
    if order_R is None:
        return (weights_TK.float() @ out_RD).to(x_TD.dtype)
    return combine(out_RD, order_R, weights_TK).to(x_TD.dtype)


def _one_token_experts(x_1D: Tensor, experts: list[int], weights_K: Tensor, gate_up_E2FD: Tensor,
                       down_EDF: Tensor) -> Tensor:
    """One token (decoding a single sequence): its K experts straight from the row, without the
    sort, gather and scatter that batches need; then one weighted sum. The same sums as the other
    kernels, up to rounding."""
    act_KF = _swiglu(torch.cat([linear(x_1D, gate_up_E2FD[e]) for e in experts]))
    out_KD = torch.cat([linear(act_KF[k:k + 1], down_EDF[e]) for k, e in enumerate(experts)])
    return weights_K.to(x_1D.dtype).unsqueeze(0) @ out_KD


def reference_experts(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, gate_up_E2FD: Tensor,
                      down_EDF: Tensor) -> Tensor:
    """y = sum_i G_i * E_i(x), with G the dense [T, N] gate (zero for experts not chosen).

    Written from the paper's formula, not for speed: every expert runs on every token."""
    T = x_TD.shape[0]
    E, twoF, _ = gate_up_E2FD.shape
    G_TN = torch.zeros(T, E, dtype=weights_TK.dtype, device=x_TD.device)
    G_TN = G_TN.scatter_add(1, experts_TK, weights_TK)
    y_TD = torch.zeros_like(x_TD)
    for i in range(E):
        gate, up = gate_up_E2FD[i][: twoF // 2], gate_up_E2FD[i][twoF // 2:]
        e_TD = (F.silu(x_TD @ gate.T) * (x_TD @ up.T)) @ down_EDF[i].T
        y_TD = y_TD + G_TN[:, i:i + 1].to(x_TD.dtype) * e_TD
    return y_TD
