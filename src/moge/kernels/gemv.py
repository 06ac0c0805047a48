"""Few-row matrix products for CPU decoding, from a small C++ file built on first use.

Decoding reads every activated weight once per token, so it runs at the speed of streaming
weights from memory. MKL's matrix-vector path streams on one core, and a Python loop over a
token's K routed experts pays per-expert dispatch. `gemv` streams on all of torch's intra-op
threads and takes every input row's expert id, so a token's K experts are one call; float32,
bfloat16, int8 (with per-channel scales) and packed int4 weights share it (layouts in
csrc/gemv.cpp and moge.quant.weight_only).

The kernel is compiled with torch.utils.cpp_extension (cached per machine, -O3 -march=native,
about 10 s of CPU once) and registered as `torch.ops.moge_gemv`, with shape-only (fake) kernels
so torch.compile traces through it as one opaque op. Where it cannot be built (no compiler, a
build error) `available()` is False after one warning naming the reason, and callers take their
pure torch path. `MOGE_GEMV_KERNEL=torch` (or `set_kernel("torch")`) forces that path; `cpp`
makes a missing kernel an error.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from moge.errors import ConfigError

KERNELS = ("auto", "cpp", "torch")
_SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
# Above this many rows per weight matrix the kernel, which re-reads the input rows for every
# block of output channels, loses to a blocked GEMM (measured on an AVX-512 EPYC: from about 64
# rows for int8, 1.2-1.6x slower; callers with more rows use torch's matmul).
MAX_ROWS = 64

_choice = os.environ.get("MOGE_GEMV_KERNEL", "auto")
_lock = threading.Lock()
_state: dict[str, object] = {}
_NO_IDS = torch.empty(0, dtype=torch.long)


def set_kernel(kernel: str) -> None:
    """auto (the C++ kernel where it builds, else torch), cpp (the C++ kernel or an error), torch."""
    global _choice
    if kernel not in KERNELS:
        raise ConfigError(f"gemv kernel={kernel!r} is invalid: choose one of {KERNELS}")
    _choice = kernel
    _state.pop("use", None)
    _state.pop("vnni", None)


def kernel() -> str:
    """The kernel few-row CPU products use now: cpp or torch (builds the C++ one if needed)."""
    if _choice not in KERNELS:
        raise ConfigError(f"MOGE_GEMV_KERNEL={_choice!r} is invalid: choose one of {KERNELS}")
    if _choice == "torch":
        _state["use"] = False
        return "torch"
    reason = _build()
    if reason is None:
        _state["use"] = True
        return "cpp"
    if _choice == "cpp":
        raise RuntimeError(f"the gemv C++ kernel is unavailable: {reason}")
    _state["use"] = False
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"moge: the gemv C++ kernel is unavailable ({reason}); decoding on CPU takes the slower "
                      f"torch path", RuntimeWarning, stacklevel=3)
    return "torch"


def available() -> bool:
    """Whether the C++ kernel runs here (decided once; cheap after the first call)."""
    use = _state.get("use")
    if use is None:
        use = kernel() == "cpp"
    return bool(use)


def _build() -> str | None:
    """Compile and load the kernel once per process (cached on disk); None or why it failed."""
    if "reason" in _state:
        return _state["reason"]  # type: ignore[return-value]
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _try_build()
    return _state["reason"]  # type: ignore[return-value]


def _cpu_tag() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:10]


def _try_build() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r} on PATH)"
    if not _SOURCE.is_file():
        return f"its source {_SOURCE.name} is missing from the installed package"
    if shutil.which("ninja") is None:  # torch's builder calls `ninja` from PATH: use the pip package's
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            return "ninja is not installed (pip install ninja): torch builds C++ extensions with it"
    try:
        from torch.utils.cpp_extension import load

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # -march=native code must not be reused by another CPU sharing the build cache: the
            # extension's name carries a hash of this CPU's model and instruction-set flags
            load(name=f"moge_gemv_{_cpu_tag()}", sources=[str(_SOURCE)],
                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
        torch.ops.moge_gemv.dense  # noqa: B018 (raises if the library did not register)
        _register_fakes()
    except Exception as e:  # noqa: BLE001 (any build failure falls back, with its reason)
        lines = [ln.strip() for ln in str(e).strip().splitlines()]
        errors = [ln for ln in lines if "error:" in ln.lower()]  # the compiler's own message
        detail = (errors or lines or [""])[-1 if not errors else 0]
        return f"building it failed: {type(e).__name__}: {detail}"[:500]
    return None


def _register_fakes() -> None:
    """Shape-only kernels, so torch.compile can trace the ops (once per process)."""
    if _state.get("fakes"):
        return

    @torch.library.register_fake("moge_gemv::dense")
    def _(x, w, scale, row_expert):
        return x.new_empty(x.shape[0], w.shape[-2])

    @torch.library.register_fake("moge_gemv::int4")
    def _(x, w, scale, zero, row_expert, group_size):
        return x.new_empty(x.shape[0], w.shape[-2])

    @torch.library.register_fake("moge_gemv::i8")
    def _(x, w, row_expert):
        return x.new_empty(x.shape[0], w.shape[-2], dtype=torch.int32)

    _state["fakes"] = True


def int8_gemv(xq_RK: Tensor, w: Tensor, row_expert: Tensor | None = None) -> Tensor:
    """Exact int32 [R, N] = xq [R, K] @ w[e(r)].T for int8 activations and int8 weights (one
    [N, K] matrix or a stack [E, N, K]; `row_expert` as in `gemv`). AVX-512 VNNI where the CPU has
    it, a scalar loop elsewhere (`vnni()` says which)."""
    return torch.ops.moge_gemv.i8(xq_RK, w, _NO_IDS if row_expert is None else row_expert)


def vnni() -> bool:
    """Whether the built kernel multiplies int8 with AVX-512 VNNI (else a scalar loop)."""
    if "vnni" not in _state:  # asked on every int8 product: read from the library once
        _state["vnni"] = available() and bool(torch.ops.moge_gemv.vnni())
    return bool(_state["vnni"])


def gemv(x_RK: Tensor, w: Tensor, scale: Tensor | None = None, row_expert: Tensor | None = None, *,
         zero: Tensor | None = None, group_size: int = 0) -> Tensor:
    """y [R, N] float32 = x [R, K] @ w[e(r)].T through the C++ kernel (check `available()` first).

    `w`: one [N, K] matrix or a stack [E, N, K] of float32, bfloat16 or int8 (int8 with `scale`
    [E, N]), or packed int4 uint8 [E, N, K/2] with `scale` [E, N, K/G], optional `zero` and
    `group_size` G. `row_expert` [R] int64 names each row's matrix, rows of one matrix adjacent;
    None: every row uses the first."""
    x = x_RK if x_RK.dtype == torch.float32 else x_RK.float()
    ids = _NO_IDS if row_expert is None else row_expert
    if w.dtype == torch.uint8:
        return torch.ops.moge_gemv.int4(x, w, scale, zero, ids, group_size)
    return torch.ops.moge_gemv.dense(x, w, scale, ids)
