"""Pick torch's CPU thread count for a decode loop by timing it, and keep re-checking.

A decode step is a few hundred small kernels, each an OpenMP parallel region that ends in a
barrier. On idle cores more threads stream the weights faster; when another process holds one of
the cores, every barrier waits for a thread that is not running, and two threads can be several
times slower than one (measured here: 2-thread decode fell to a quarter of its speed beside one
busy process, while 1 thread lost little). Which count is faster depends on the load at that
moment, so it is measured, not assumed: the tuner times a few steps at each candidate count, runs
the fastest, and probes again every `period` steps, or at once when steps become much slower than
the chosen count's probe (load arrived).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def thread_candidates(max_threads: int) -> list[int]:
    """1, 2, 4, ... up to max_threads, and max_threads itself."""
    out, n = [], 1
    while n < max_threads:
        out.append(n)
        n *= 2
    return out + [max_threads]


class ThreadTuner:
    """Times `run(step)` calls and sets the thread count of the next ones.

    probe_steps: steps timed per candidate in a probe (the first one after a switch is not
    counted: a changed pool pays a start-up cost). period: steps between probes. slowdown: re-probe
    early when the median of the last probe_steps steps exceeds the chosen probe time this much.
    """

    def __init__(self, max_threads: int | None = None, *, probe_steps: int = 3, period: int = 64,
                 slowdown: float = 1.5, set_threads: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.perf_counter):
        max_threads = max_threads or torch.get_num_threads()
        self.candidates = thread_candidates(max_threads)
        self.probe_steps, self.period, self.slowdown = probe_steps, period, slowdown
        self._set, self._clock = set_threads, clock
        self.current: int | None = None
        self.choice = max_threads
        self.used: Counter[int] = Counter()
        self.probes = 0
        self._best_time = float("inf")
        self._recent: list[float] = []
        self._queue: list[int] = []  # the probe's remaining schedule: one thread count per step
        self._samples: dict[int, list[float]] = {}
        self._since_probe = 0
        self._start_probe()

    @property
    def probing(self) -> bool:
        return bool(self._queue)

    def _start_probe(self) -> None:
        self.probes += 1
        # the current choice last, so the probe ends on the count it most likely keeps
        order = sorted(self.candidates, key=lambda c: c == self.choice)
        self._queue = [c for c in order for _ in range(self.probe_steps + 1)] if len(self.candidates) > 1 else []
        self._samples = {c: [] for c in self.candidates}

    def _apply(self, threads: int) -> bool:
        """Set the count; True when it changed (the next timing is a warm-up)."""
        if threads == self.current:
            return False
        self._set(threads)
        self.current = threads
        return True

    def run(self, step: Callable[[], T]) -> T:
        """Run one decode step at the tuner's thread count and learn from its time."""
        probing = self.probing
        threads = self._queue.pop(0) if probing else self.choice
        switched = self._apply(threads)
        t0 = self._clock()
        out = step()
        seconds = self._clock() - t0
        self.used[threads] += 1
        if probing:
            if not switched:
                self._samples[threads].append(seconds)
            if not self._queue:
                self._finish_probe()
            return out
        self._since_probe += 1
        self._recent = (self._recent + [seconds])[-self.probe_steps:]
        slow = len(self._recent) == self.probe_steps and statistics.median(self._recent) > self.slowdown * \
            self._best_time
        if self._since_probe >= self.period or slow:
            self._start_probe()
        return out

    def _finish_probe(self) -> None:
        medians = {c: statistics.median(s) for c, s in self._samples.items() if s}
        if medians:
            self.choice = min(medians, key=lambda c: (medians[c], c))
            self._best_time = medians[self.choice]
        self._since_probe = 0
        self._recent = []

    def summary(self) -> dict:
        """Steps run at each thread count, the current choice and the number of probes."""
        return {"steps_by_threads": {str(k): v for k, v in sorted(self.used.items())}, "choice": self.choice,
                "probes": self.probes}


class FixedThreads:
    """The same interface for a thread count the user fixed (or a device that is not a CPU)."""

    def __init__(self, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.choice = torch.get_num_threads()
        self.used: Counter[int] = Counter()

    def run(self, step: Callable[[], T]) -> T:
        self.used[self.choice] += 1
        return step()

    def summary(self) -> dict:
        return {"steps_by_threads": {str(k): v for k, v in sorted(self.used.items())}, "choice": self.choice,
                "probes": 0}


def decode_threads(threads: int | str | None, device: torch.device | str = "cpu") -> ThreadTuner | FixedThreads:
    """`--threads N` fixes N; `auto` (or None) tunes on a CPU between 1 and the cores this process may use."""
    if str(torch.device(device).type) != "cpu" or (threads not in (None, "auto") and int(threads) > 0):
        return FixedThreads(None if threads in (None, "auto") else int(threads))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ThreadTuner(max(1, min(cores, torch.get_num_threads())))
