"""The engine loop, and the text of each request as its tokens arrive.

The engine steps on a thread apart from the event loop's (`wait_for_work` / `step`; which thread:
see `EngineRunner`); each output reaches the coroutine serving its request through that request's
asyncio queue (`loop.call_soon_threadsafe`), so the event loop never waits on a forward pass.
`TextStream` turns the growing list of token ids into text deltas: it decodes the whole completion
each time (a token's text can depend on its neighbours), holds back a trailing partial UTF-8
character (U+FFFD) and any tail that could be the start of a stop string, and cuts the text at the
first stop string.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from moge.inference.engine import Engine, Output, Request, Stats
from moge.inference.tokenizer import Tokenizer
from moge.serve.metrics import ServerMetrics

log = logging.getLogger("moge.serve")

REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of a character not yet complete


class TextStream:
    """Incremental detokenisation of one completion with stop strings.

    `push(ids, final)` returns the new text to send. `text` is everything sent so far; `stopped`
    is set once a stop string was found (the text ends before it)."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool = False, strip_last: bool = False) -> str:
        """Add `ids`; `strip_last` drops the last id from the text (the eos / turn end that stopped it)."""
        self.ids.extend(ids)
        if self.tokenizer is None or self.stopped:
            return ""
        shown = self.ids[:-1] if strip_last and self.ids else self.ids
        full = self.tokenizer.decode(shown)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, final, self.stopped = full[:cut], True, True
        end = len(full) if final else self._safe_end(full)
        delta = full[len(self.text):max(end, len(self.text))]
        self.text += delta
        return delta

    def _safe_end(self, full: str) -> int:
        end = len(full)
        while end > len(self.text) and full[end - 1] == REPLACEMENT:
            end -= 1
        hold = 0
        for s in self.stop:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, end), hold, -1):
                if full.endswith(s[:k], 0, end):
                    hold = k
                    break
        return max(end - hold, len(self.text))


@dataclass
class RequestHandle:
    """A request in the engine as its coroutine sees it: outputs arrive on `queue`."""

    request_id: str
    prompt_tokens: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    added_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    last_token_s: float | None = None
    generated: int = 0
    drafted: int = 0
    accepted: int = 0


class EngineRunner:
    """Runs the engine loop. `submit` from the event loop; outputs come back on the handle's queue.

    Where the loop runs matters on CPU: torch's OpenMP/MKL kernels run fast only on the thread that
    first used them (libgomp keeps its spinning worker team for that root thread); from any other
    thread a few-row matmul took 1.6x as long, and serving ran at 84 instead of 142 output tokens/s
    (moge-small, 2 threads). `moge serve` therefore calls `run()` on the main thread, which loaded
    the model, and runs the HTTP server on a side thread (`own_thread=False`); `start()` runs the
    loop on a thread of its own, for in-process apps and tests."""

    def __init__(self, engine: Engine, keepalive_s: float | None = None, own_thread: bool = True):
        self.engine = engine
        self.own_thread = own_thread
        # distributed: the followers wait in a collective that times out, so an idle rank 0 pings them
        # (Engine.keepalive, a no-op step for the followers) at least this often
        self.keepalive_s = keepalive_s
        self.metrics = ServerMetrics(engine.stats)
        self.error: str | None = None  # set when the engine thread died: the server is unhealthy
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None  # the loop's own thread (own_thread=True)
        self._loop_thread: threading.Thread | None = None  # whichever thread runs the loop
        self._looping = threading.Event()
        self._loop_done = threading.Event()
        self._closed = False

    @property
    def model_config(self):
        return self.engine.model.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        if self.own_thread:
            return self.error is None and self._thread is not None and self._thread.is_alive()
        return self.error is None and self._looping.is_set()

    def start(self) -> None:
        """Run the loop on a thread of its own (a no-op when the caller runs it: own_thread=False)."""
        if self.own_thread and self._thread is None:
            self._thread = threading.Thread(target=self.run, name="moge-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop and wait for it, then `engine.close()` (which releases distributed followers).
        Idempotent; may be called from any thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if threading.current_thread() is not self._loop_thread:
            self._loop_done.wait(timeout if self._looping.is_set() else 0)
        self._fail_all("abort", None)
        self.engine.close()

    def check(self, request: Request) -> None:
        self.engine.check(request)

    def submit(self, request: Request) -> RequestHandle:
        """Queue `request` (call on the event loop). Raises QueueFull or ConfigError; nothing is kept then."""
        if self.error is not None or self._closed:
            raise RuntimeError(self.error or "the engine is shut down")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(request.request_id, len(request.prompt_ids), asyncio.Queue(), loop)
        with self._lock:
            self._handles[request.request_id] = handle
        try:
            self.engine.add(request)
        except BaseException:
            with self._lock:
                self._handles.pop(request.request_id, None)
            raise
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        return handle

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> Stats:
        return self.engine.stats()

    # ---- the engine thread ----------------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, on the calling thread, until `close()`."""
        self._loop_thread = threading.current_thread()
        self._looping.set()
        try:
            self._loop()
        finally:
            self._looping.clear()
            self._loop_done.set()

    def _loop(self) -> None:
        keepalive = self.engine.keepalive if self.keepalive_s else None
        last = time.monotonic()
        try:
            while not self._stopping.is_set():
                if not self.engine.wait_for_work(timeout=0.25):
                    if keepalive is not None and time.monotonic() - last > self.keepalive_s:
                        keepalive()
                        last = time.monotonic()
                    continue
                last = time.monotonic()
                outputs = self.engine.step()
                if outputs:
                    self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 - a bug in the engine: fail every request, report unhealthy
            self.error = f"the engine failed: {type(e).__name__}: {e}"
            log.error("moge serve: %s\n%s", self.error, traceback.format_exc())
            self._fail_all("error", self.error)

    def _deliver(self, outputs: list[Output]) -> None:
        now = time.perf_counter()
        m = self.metrics
        for out in outputs:
            with self._lock:
                handle = self._handles.get(out.request_id)
                if handle is not None and out.finished:
                    del self._handles[out.request_id]
            if handle is None:
                continue
            if out.token_ids:
                if handle.first_token_s is None:
                    handle.first_token_s = now
                    m.ttft.observe(now - handle.added_s)
                handle.last_token_s = now
                handle.generated += len(out.token_ids)
                m.generation_tokens.inc(len(out.token_ids))
            if out.drafted > handle.drafted or out.accepted > handle.accepted:
                m.spec_drafted.inc(max(0, out.drafted - handle.drafted))
                m.spec_accepted.inc(max(0, out.accepted - handle.accepted))
                handle.drafted, handle.accepted = max(handle.drafted, out.drafted), max(handle.accepted, out.accepted)
            if out.finished and out.finish_reason != "error" and handle.generated > 1:
                m.tpot.observe((handle.last_token_s - handle.first_token_s) / (handle.generated - 1))
            _put(handle, out)

    def _fail_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            _put(handle, Output(handle.request_id, [], reason, error))


def _put(handle: RequestHandle, out: Output) -> None:
    try:
        handle.loop.call_soon_threadsafe(handle.queue.put_nowait, out)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass
