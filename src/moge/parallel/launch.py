"""Where a process runs (its device, and whether its dtype suits that device), starting
torch.distributed under torchrun, and turning a dead or hung peer into a clear error.

`resolve_device` turns --device (auto, cpu, cuda, cuda:N) into a device that exists, the local
rank's GPU under torchrun by default. `torchrun --nproc-per-node N -m moge ...` sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them, with the
backend that moves the device's tensors (nccl for CUDA, gloo for CPU). Every collective waits at
most `timeout_s`: when a rank dies, its peers see the connection close (gloo) or the timeout
expire, and raise `DistributedError` naming the rank and the limit, instead of hanging. torchrun
then stops the remaining workers.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

from moge.errors import ConfigError, DistributedError

DEFAULT_TIMEOUT_S = 300.0
# What gloo and nccl say when a collective fails because a peer is gone or silent. Only these (and
# torch's distributed error types) are relabelled: any other RuntimeError keeps its type and message.
_PEER_FAILURE = re.compile(r"gloo/transport/|connection (?:closed|reset) by peer|timed out waiting .* for "
                           r"(?:send|recv)|pair closure|watchdog caught collective operation timeout|"
                           r"nccl communicator was aborted|ncclRemoteError|ncclSystemError", re.IGNORECASE)
_DIST_ERRORS = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError")
                     if hasattr(dist, name))


# torch gives new process groups its 30-minute default, not the world group's timeout: the timeout
# the world was started with is kept here so the parallel plans' groups get the same one.
_timeout_s: float | None = None


def group_timeout() -> datetime.timedelta | None:
    """The timeout for new process groups: the one the world was started with, by `init_distributed`
    or read back from the default group (None: not known, torch's default applies)."""
    if _timeout_s:
        return datetime.timedelta(seconds=_timeout_s)
    if dist.is_available() and dist.is_initialized():
        try:
            backend = dist.distributed_c10d._get_default_group()._get_backend(comm_device())
            return backend.options._timeout
        except (AttributeError, RuntimeError):
            return None
    return None


def _remember_timeout(timeout_s: float) -> None:
    global _timeout_s
    _timeout_s = timeout_s


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device this process runs on. auto (or None): under torchrun the local rank's GPU when
    CUDA is present, else cuda:0 when present, else cpu; cuda: the local rank's GPU (cuda:0
    outside torchrun); cuda:N: that GPU. Raises ConfigError for a device that does not exist."""
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is invalid: choose one of {', '.join(DEVICE_CHOICES)}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device={device!r} is invalid: choose one of {', '.join(DEVICE_CHOICES)}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"device={device!r} is invalid: this machine has no CUDA device (torch "
                          f"{torch.__version__}, torch.cuda.is_available() is False); valid: cpu")
    index = dev.index if dev.index is not None else (local_rank() if launched_by_torchrun() else 0)
    if index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        why = f"local rank {index} has no GPU of its own" if dev.index is None else f"there is no GPU {index}"
        raise ConfigError(f"device={device!r} is invalid: {why}; this machine has {count} CUDA device(s) "
                          f"(valid: cpu, {have})")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """The process-group backend that moves this device's tensors: nccl for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """Raise ConfigError when `device` cannot run `dtype` (bf16 on a GPU without it, or any dtype
    whose matmul the device's kernels lack)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_has_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"dtype=bfloat16 is invalid on {device} ({name}): the GPU has no bfloat16 support "
                          f"(compute capability 8.0 or newer needed); use --dtype float16 or float32")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).softmax(-1)
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"dtype={str(dtype).removeprefix('torch.')} is invalid on {device}: its kernels cannot "
                          f"run it ({first}); use --dtype float32") from None


def _cuda_has_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def slow_dtype_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning when `dtype` runs but slowly on `device` (bf16 or fp16 on a CPU without native
    instructions for it, where torch converts element by element), else None."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    flags = cpu_flags()
    if not flags:  # not known (no /proc/cpuinfo): say nothing rather than guess
        return None
    native = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"}, torch.float16: {"avx512_fp16", "amx_fp16", "fphp"}}
    if flags & native[dtype]:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"{name} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native {name} instructions) is "
            f"emulated and can be several times slower than float32; pass --dtype float32 to trade memory for speed")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None,
                     device: torch.device | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (no-op when already done).
    The backend follows `device` (default: `resolve_device("auto")`): nccl for CUDA, gloo for CPU.
    Returns (rank, world size)."""
    if not timeout_s or timeout_s <= 0:
        raise ConfigError(f"dist_timeout={timeout_s!r} is invalid: must be a positive number of seconds")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"torch.distributed environment variables {missing} are not set: launch with "
                           f"`torchrun --nproc-per-node N -m moge ...`")
    if device is None:
        device = resolve_device("auto")
    if backend is None:
        backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(device if device.type == "cuda" else torch.device("cuda", local_rank()))
    with peer_failures_as_errors(timeout_s):
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _remember_timeout(timeout_s)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def peer_failures_as_errors(timeout_s: float) -> Iterator[None]:
    """Re-raise communication failures (a peer's socket closed, a collective timed out) as
    DistributedError with this rank and the time limit in the message."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # gloo and nccl errors are RuntimeError subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not (isinstance(e, _DIST_ERRORS) or _PEER_FAILURE.search(str(e))):
            raise
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        raise DistributedError(
            f"rank {rank}: a collective failed: another rank died or did not answer within the "
            f"{timeout_s:g} s limit (--dist-timeout). Cause: {first}") from e


def comm_device() -> torch.device:
    """Where small control tensors (flags, counters) must live for the default group's backend:
    nccl only moves CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _spawned(rank: int, fn, world: int, init_file: str, out_dir: str, timeout_s: float, threads: int,
             args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _remember_timeout(timeout_s)
    try:
        with peer_failures_as_errors(timeout_s):
            result = fn(rank, world, *args)
            torch.save(result, os.path.join(out_dir, f"rank-{rank}.pt"))
            # every rank is done with the group before any tears it down: a rank destroying its gloo
            # pairs while a peer still tears down or sends once aborted the peer ("terminate called
            # without an active exception") after a test whose ranks had both failed a save cleanly
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, timeout_s: float = 120.0, threads: int = 1) -> list:
    """Run `fn(rank, world, *args)` in `world` fresh CPU processes joined by a gloo process group
    (no torchrun needed); return each rank's result (anything torch.save can write). `fn` must be
    importable (a module-level function). A failing rank raises here with its traceback."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="moge-spawn-") as tmp:
        mp.spawn(_spawned, args=(fn, world, os.path.join(tmp, "init"), tmp, timeout_s, threads, args),
                 nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank-{r}.pt"), weights_only=True) for r in range(world)]
