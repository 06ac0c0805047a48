"""A process's own memory, as the kernel counts it, for the per-rank memory tests (Linux /proc; the
peak falls back to getrusage elsewhere)."""

from __future__ import annotations

import os
import resource


def rss_kib(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak since start or since `reset_peak`), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> None:
    """Make the peak (VmHWM) restart from the current RSS (Linux: clear_refs 5)."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def record_reads(monkeypatch) -> list[tuple[str, tuple, int]]:
    """From now on in this process, every piece the partial checkpoint reader reads, as (file key,
    the index read, bytes): what a rank actually takes from the files."""
    from moge.checkpoint.partial import PartialSource

    read: list[tuple[str, tuple, int]] = []
    real = PartialSource._read_file

    def counting(self, path, reads):
        read.extend((key, src, dst.numel() * dst.element_size()) for key, src, dst in reads)
        return real(self, path, reads)

    monkeypatch.setattr(PartialSource, "_read_file", counting)
    return read
