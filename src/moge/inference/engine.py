"""The serving engine: iteration-level (continuous) batching over a paged KV cache.

Every `step()` is one forward of the model over a flat batch of tokens from many requests:
one token of each running decode, then chunks of prompts (chunked prefill) until the step's token
budget is spent. Requests join and leave the batch at every step. The KV cache is one pool of
fixed-size blocks (moge.nn.paged) with a hard size; a request is admitted only when the blocks for
its whole prompt plus `max_tokens` can be reserved, so a running request never runs out of cache
and nothing is ever preempted. What cannot be admitted waits in a bounded queue (`QueueFull`
beyond it: the server's 429).

Thread model: `add`, `abort` and `stats` may be called from any thread (the HTTP server's event
loop); `step` runs on one engine thread. Under torch.distributed rank 0 owns the scheduler and
broadcasts each step's batch; the other ranks run `follow()` and step in lockstep.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moge.errors import ConfigError, bad_value
from moge.inference.generate import Sampling, sample_next, sampling_probs
from moge.inference.threads import FixedThreads, ThreadTuner
from moge.nn.model import PanguProMoEForCausalLM
from moge.nn.paged import KVPool, PagedBatch, Span
from moge.parallel.lockstep import share_from_rank0


class QueueFull(Exception):
    """The waiting queue is at `EngineConfig.max_waiting`: try again later (HTTP 429)."""

    def __init__(self, waiting: int, retry_after_s: float):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in {retry_after_s:.0f} s")
        self.waiting, self.retry_after_s = waiting, retry_after_s


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine. `kv_blocks` x `block_size` tokens of KV cache, for all requests together."""

    kv_blocks: int = 1024
    block_size: int = 16
    max_running: int = 32  # requests in the running batch at once
    step_tokens: int = 256  # token budget of one step (decodes + prefill chunks)
    max_waiting: int = 64  # queued requests beyond the running batch; more -> QueueFull
    max_model_len: int | None = None  # prompt + max_tokens at most (default: max_position_embeddings)
    static: bool = False  # static batching: admit only into an empty batch, prefill whole (a baseline)
    speculative: bool = False  # MTP speculative decoding (one draft token per step)


@dataclass
class Request:
    """One generation request: the prompt's token ids, the new tokens' limit and how to sample.
    A request stops at any of `stop_ids` (the server passes eos / the chat turn end, or nothing
    for `ignore_eos`), or after `max_tokens` new tokens."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()


@dataclass
class Output:
    """New tokens of one request from one step. `finish_reason` is set on the request's last output:
    "stop" (a stop id, included in `token_ids`), "length" (max_tokens), "abort" (cancelled) or
    "error" (`error` says what failed; the other requests go on)."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    # speculative decoding: drafts proposed / accepted for this request so far
    drafted: int = 0
    accepted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Stats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    threads: int = 0  # the CPU threads decode steps run with now (chosen by the tuner, or fixed)


class _Seq:
    """A request inside the engine: its tokens so far and its share of the KV pool."""

    def __init__(self, request: Request, reserved: int, generator: torch.Generator | None):
        self.request = request
        self.tokens = list(request.prompt_ids)
        self.prompt_len = len(request.prompt_ids)
        self.computed = 0  # positions whose keys/values are in the pool
        self.blocks: list[int] = []
        self.reserved = reserved  # blocks set aside for the whole request at admission
        self.generator = generator
        self.admitted = False  # holds its reservation (left the waiting queue)
        self.drafted = self.accepted = 0
        self.draft: int | None = None  # speculative decoding: the MTP module's guess for the next token
        self.draft_probs: Tensor | None = None  # and the distribution it was drawn from (sampling)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass(frozen=True)
class _Plan:
    """One step as every rank runs it: the flat input ids, each sequence's span in the pool and the
    positions (indices into the flat row) whose logits are wanted."""

    input_ids: list[int]
    spans: list[Span]
    logit_rows: list[int]
    hidden_rows: list[int] | None = None  # an MTP pass: which rows of the trunk's hidden states it reads


class Engine:
    """Continuous batching on one model (or on rank 0 of a parallel model; see the module doc)."""

    def __init__(self, model: PanguProMoEForCausalLM, config: EngineConfig = EngineConfig(), *,
                 distributed: bool = False, threads: ThreadTuner | FixedThreads | None = None):
        """`threads` runs the decode-only steps (moge.inference.threads.decode_threads: tuned by timing
        them, or fixed); steps with prompt chunks run at its current count, untimed (their cost
        varies with the chunks, so they would mislead the timing)."""
        self.model, self.config, self.distributed = model, config, distributed
        self.threads = threads or FixedThreads()
        self.cfg = model.config
        self.max_model_len = _check_config(config, self.cfg)
        self.device = next(model.parameters()).device
        self.pool = _allocate_pool(model, config, self.device)
        self.mtp_pool = _allocate_pool(model, config, self.device, mtp=True) if config.speculative else None
        self._free_blocks = list(range(config.kv_blocks - 1, -1, -1))  # a stack: low ids first
        self._unreserved = config.kv_blocks
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # in admission order
        self._ids: set[str] = set()
        self._request_s = 1.0  # running mean of a finished request's time in the engine (Retry-After)
        self._started: dict[str, float] = {}

    # ---- any thread -------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raise ConfigError, naming the field, for a request that could never run."""
        cfg, prompt = self.cfg, request.prompt_ids
        if not prompt:
            raise ConfigError("prompt: is empty: give at least one token")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise ConfigError(f"prompt: token id {bad[0]!r} is out of range: valid ids are 0..{cfg.vocab_size - 1}")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise ConfigError(f"max_tokens: {request.max_tokens!r} is invalid: must be an integer >= 1")
        total = len(prompt) + request.max_tokens
        if total > self.max_model_len:
            raise ConfigError(f"prompt: {len(prompt)} tokens + max_tokens={request.max_tokens} exceed the context of "
                              f"{self.max_model_len} tokens")
        need = self._blocks_for(total)
        if need > self.config.kv_blocks:
            raise ConfigError(f"max_tokens: {len(prompt)} prompt tokens + max_tokens={request.max_tokens} need {need} "
                              f"KV blocks of {self.config.block_size} tokens; the cache has {self.config.kv_blocks}")

    def add(self, request: Request) -> None:
        """Queue a request (checked first). Raises QueueFull when `max_waiting` requests already wait."""
        self.check(request)
        with self._lock:
            if request.request_id in self._ids:
                raise ConfigError(f"request_id: {request.request_id!r} is already in the engine")
            waiting = len(self._waiting) + len(self._inbox)
            if waiting >= self.config.max_waiting:
                raise QueueFull(waiting, max(1.0, self._request_s * (waiting + 1) / self.config.max_running))
            self._ids.add(request.request_id)
            self._inbox.append(request)
            self._started[request.request_id] = time.perf_counter()
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request: it ends with finish_reason "abort" and its blocks are freed at the next
        step. Unknown or finished ids are ignored."""
        with self._lock:
            if request_id in self._ids:
                self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> Stats:
        with self._lock:
            return Stats(len(self._waiting) + len(self._inbox), len(self._running),
                         self.config.kv_blocks - len(self._free_blocks), self.config.kv_blocks,
                         self.config.block_size, self.threads.choice)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self._waiting or self._running)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (True) or `timeout` passes (False)."""
        if self.has_work():
            return True
        self._wake.wait(timeout)
        self._wake.clear()
        return self.has_work()

    # ---- the engine thread -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """One iteration: take in new requests and cancellations, schedule, run one forward, sample."""
        outputs = self._take_inbox()
        items = self._schedule()
        if not items:
            return outputs
        for seq, n in items:
            self._grow(seq, seq.computed + n)
        if all(n == 1 for _, n in items):  # decodes only: comparable steps, timed by the tuner
            outputs += self.threads.run(lambda: self._run(items))
        else:
            outputs += self._run(items)
        return outputs

    def keepalive(self) -> None:
        """Tell the followers the engine is alive though idle (an empty plan), so their wait for the
        next step never reaches the collective timeout. The server calls it when idle."""
        if self.distributed:
            share_from_rank0(_Plan([], [], []))

    def close(self) -> None:
        """Release the followers of a distributed engine (they return from `follow`)."""
        if self.distributed:
            share_from_rank0(None)

    # ---- scheduling ----------------------------------------------------------------------------------

    def _take_inbox(self) -> list[Output]:
        with self._lock:
            inbox, aborts = self._inbox, self._aborts
            self._inbox, self._aborts = [], []
        for request in inbox:
            self._waiting.append(_Seq(request, self._blocks_for(len(request.prompt_ids) + request.max_tokens),
                                      _generator(request.sampling)))
        outputs = []
        for rid in aborts:
            for queue in (self._waiting, self._running):
                seq = next((s for s in queue if s.request.request_id == rid), None)
                if seq is not None:
                    queue.remove(seq)
                    outputs.append(self._finish(seq, "abort"))
        return outputs

    def _schedule(self) -> list[tuple[_Seq, int]]:
        """(sequence, new tokens) of this step: every running decode, then prompt chunks within the
        step's token budget, admitting waiting requests first come first served while blocks last."""
        cfg = self.config
        budget = cfg.step_tokens
        items: list[tuple[_Seq, int]] = []
        for seq in self._running:  # decodes first: running requests never stall behind a prompt
            if seq.computed >= seq.prompt_len:  # the last token, and the draft when there is one
                items.append((seq, len(seq.tokens) - seq.computed + (seq.draft is not None)))
                budget -= items[-1][1]
        for seq in self._running:  # prompts admitted earlier and not yet fully prefilled
            if seq.computed < seq.prompt_len and budget > 0:
                n = seq.prompt_len - seq.computed if cfg.static else min(seq.prompt_len - seq.computed, budget)
                items.append((seq, n))
                budget -= n
        if cfg.static and self._running:
            return items  # static batching: nobody joins a running batch
        while self._waiting and len(self._running) < cfg.max_running and (budget > 0 or cfg.static):
            seq = self._waiting[0]
            if seq.reserved > self._unreserved:
                break  # first come first served: the head waits for blocks, nobody overtakes it
            self._waiting.popleft()
            self._unreserved -= seq.reserved
            seq.admitted = True
            self._running.append(seq)
            n = seq.prompt_len if cfg.static else min(seq.prompt_len, budget)
            items.append((seq, n))
            budget -= n
        return items

    def _grow(self, seq: _Seq, length: int) -> None:
        """Give `seq` blocks for `length` positions (from its reservation: the pool cannot run out)."""
        with self._lock:
            while len(seq.blocks) * self.config.block_size < length:
                seq.blocks.append(self._free_blocks.pop())

    def _finish(self, seq: _Seq, reason: str, tokens: list[int] | None = None, error: str | None = None) -> Output:
        with self._lock:
            self._free_blocks.extend(reversed(seq.blocks))
            self._ids.discard(seq.request.request_id)
            started = self._started.pop(seq.request.request_id, None)
        seq.blocks = []
        if seq.admitted:
            self._unreserved += seq.reserved
        if started is not None and reason in ("stop", "length"):
            self._request_s = 0.9 * self._request_s + 0.1 * (time.perf_counter() - started)
        return Output(seq.request.request_id, tokens or [], reason, error, seq.drafted, seq.accepted)

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    # ---- running a step ------------------------------------------------------------------------------

    def _plan(self, items: list[tuple[_Seq, int]]) -> tuple[_Plan, list[tuple[_Seq, list[int]]]]:
        """The flat batch of `items` and, per sequence that gets a next token, its logit rows (two
        for a speculative decode: after the last token and after the draft)."""
        ids, spans, rows, sampled = [], [], [], []
        for seq, n in items:
            fed = seq.tokens[seq.computed:seq.computed + n]
            if seq.draft is not None and seq.computed + n == len(seq.tokens) + 1:
                fed = fed + [seq.draft]
            ids.extend(fed)
            spans.append(Span(tuple(seq.blocks), seq.computed + n, n))
            due = seq.computed + n - len(seq.tokens) + 1  # fed positions at or past the last known token
            if due > 0:
                sampled.append((seq, list(range(len(ids) - due, len(ids)))))
                rows.extend(sampled[-1][1])
        return _Plan(ids, spans, rows), sampled

    def _run(self, items: list[tuple[_Seq, int]]) -> list[Output]:
        """Forward the items together; when that fails, each alone, so one bad request fails alone."""
        plan, sampled = self._plan(items)
        try:
            logits, hidden = self._forward(plan)
        except Exception as e:  # noqa: BLE001 - isolated below, reported per request
            if len(items) == 1:
                return [self._fail(items[0][0], e)]
            outputs = []
            for item in items:
                outputs += self._run([item])
            return outputs
        before = {id(seq): seq.computed for seq, _ in items}
        for seq, n in items:
            seq.computed += n
        outputs, row = [], 0
        for seq, rows in sampled:
            logits_RV, row = logits[row:row + len(rows)], row + len(rows)
            try:
                emitted = self._next_tokens(seq, logits_RV)
            except Exception as e:  # noqa: BLE001
                outputs.append(self._fail(seq, e))
                continue
            outputs.append(self._emit(seq, emitted))
        if self.config.speculative:
            running = [(seq, n) for seq, n in items if seq in self._running]
            offsets, offset = {}, 0
            for seq, n in items:
                offsets[id(seq)], offset = offset, offset + n
            try:
                self._draft(running, before, offsets, hidden)
            except Exception as e:  # noqa: BLE001 - the MTP pass failed: its requests fail, the server stays up
                outputs += [self._fail(seq, e) for seq, _ in running]
        return outputs

    def _next_tokens(self, seq: _Seq, logits_RV: Tensor) -> list[int]:
        """The tokens a sequence gains from its logit rows: one sampled token, or with a draft the
        accepted draft plus one (speculative sampling: each token follows the target distribution).
        Rolls the sequence's cached length back past a rejected draft."""
        sampling, draft = seq.request.sampling, seq.draft
        if logits_RV.shape[0] == 1:
            return [_sample(logits_RV[0], seq)]
        seq.draft, seq.drafted = None, seq.drafted + 1
        if sampling.temperature == 0:
            target = logits_RV.argmax(-1).tolist()
            accepted = target[0] == draft
            nxt = target[1] if accepted else target[0]
        else:
            p_RV = sampling_probs(logits_RV.float().cpu(), sampling)
            q_V = seq.draft_probs
            u = float(torch.rand((), generator=seq.generator))
            accepted = u * float(q_V[draft]) < float(p_RV[0, draft])  # u < min(1, p/q)
            if accepted:
                nxt = int(torch.multinomial(p_RV[1], 1, generator=seq.generator))
            else:
                residual = (p_RV[0] - q_V).clamp_min(0)
                weights = residual if float(residual.sum()) > 0 else p_RV[0]
                nxt = int(torch.multinomial(weights, 1, generator=seq.generator))
        if accepted:
            seq.accepted += 1
            return [draft, nxt]
        seq.computed -= 1  # the draft's keys/values are left in the pool, to be overwritten
        return [nxt]

    def _emit(self, seq: _Seq, tokens: list[int]) -> Output:
        """Append `tokens` up to a stop id or max_tokens; the request's output of this step."""
        out, reason = [], None
        for token in tokens:
            seq.tokens.append(token)
            out.append(token)
            reason = "stop" if token in seq.request.stop_ids else \
                "length" if seq.generated >= seq.request.max_tokens else None
            if reason is not None:
                break
        if reason is None:
            return Output(seq.request.request_id, out, None, None, seq.drafted, seq.accepted)
        self._running.remove(seq)
        return self._finish(seq, reason, out)

    def _fail(self, seq: _Seq, error: Exception) -> Output:
        if seq in self._running:
            self._running.remove(seq)
        return self._finish(seq, "error", error=f"{type(error).__name__}: {error}")

    def _draft(self, items: list[tuple[_Seq, int]], before: dict[int, int], offsets: dict[int, int],
               hidden_1TD: Tensor) -> None:
        """Run the MTP module over the positions each running sequence just cached (the trunk's hidden
        state at t with the token at t + 1, now known) and draw each decoding sequence's next draft."""
        ids, spans, hidden_rows, rows, drafting = [], [], [], [], []
        for seq, _ in items:
            first = before[id(seq)]
            kept = seq.computed - first
            ids.extend(seq.tokens[first + 1:seq.computed + 1])
            hidden_rows.extend(range(offsets[id(seq)], offsets[id(seq)] + kept))
            spans.append(Span(tuple(seq.blocks), seq.computed, kept))
            if seq.computed == len(seq.tokens) - 1 and seq.request.max_tokens - seq.generated >= 2:
                # decoding with room for two more tokens: the last row's logits give the draft
                rows.append(len(ids) - 1)
                drafting.append(seq)
        if not spans:
            return
        plan = _Plan(ids, spans, rows, hidden_rows)
        if self.distributed:
            share_from_rank0(plan)
        q_logits = _execute_mtp(self.model, self.mtp_pool, plan, hidden_1TD, self.device)
        for seq, q_V in zip(drafting, q_logits):
            sampling = seq.request.sampling
            if sampling.temperature == 0:
                seq.draft = int(q_V.argmax())
            else:
                seq.draft_probs = sampling_probs(q_V.float().cpu().view(1, -1), sampling)[0]
                seq.draft = int(torch.multinomial(seq.draft_probs, 1, generator=seq.generator))

    def _forward(self, plan: _Plan) -> tuple[Tensor, Tensor | None]:
        """The logits [rows, V] of one step's plan and, when drafting, the trunk's pre-norm hidden
        states [1, T, D] (broadcast first when distributed)."""
        if self.distributed:
            share_from_rank0(plan)
        return _execute(self.model, self.pool, plan, self.device)


def follow(model: PanguProMoEForCausalLM, config: EngineConfig = EngineConfig()) -> None:
    """The loop of ranks 1..W-1 under torch.distributed: run every step rank 0's Engine broadcasts,
    on this rank's share of the model and its own KV pool, until the engine closes."""
    device = next(model.parameters()).device
    _check_config(config, model.config)
    pool = _allocate_pool(model, config, device)
    mtp_pool = _allocate_pool(model, config, device, mtp=True) if config.speculative else None
    hidden = None
    with torch.inference_mode():
        while True:
            plan = share_from_rank0()
            if plan is None:
                return
            if not plan.spans:  # keepalive
                continue
            if plan.hidden_rows is None:
                _, hidden = _execute(model, pool, plan, device)
            else:
                _execute_mtp(model, mtp_pool, plan, hidden, device)


def _execute(model: PanguProMoEForCausalLM, pool: KVPool, plan: _Plan,
             device: torch.device) -> tuple[Tensor, Tensor]:
    batch = PagedBatch(pool, plan.spans, device)
    ids = torch.tensor(plan.input_ids, dtype=torch.long, device=device).view(1, -1)
    rows = torch.tensor(plan.logit_rows, dtype=torch.long, device=device)
    out = model(ids, cache=batch, logits_slice=rows)
    return out.logits[0], out.pre_norm_hidden


def _execute_mtp(model: PanguProMoEForCausalLM, pool: KVPool, plan: _Plan, hidden_1TD: Tensor,
                 device: torch.device) -> Tensor:
    """The MTP module over the plan's positions (its own one-layer pool, slot = trunk position)."""
    batch = PagedBatch(pool, plan.spans, device)
    ids = torch.tensor(plan.input_ids, dtype=torch.long, device=device).view(1, -1)
    hidden = hidden_1TD[:, torch.tensor(plan.hidden_rows, dtype=torch.long, device=device)]
    rows = torch.tensor(plan.logit_rows, dtype=torch.long, device=device)
    return model.mtp_forward(hidden, ids, cache=batch, logits_slice=rows).logits[0]


def _check_config(config: EngineConfig, cfg) -> int:
    for name in ("kv_blocks", "block_size", "max_running", "step_tokens"):
        if getattr(config, name) < 1:
            raise bad_value(name, getattr(config, name), "must be a positive integer")
    if config.max_waiting < 0:
        raise bad_value("max_waiting", config.max_waiting, "must be >= 0")
    limit = config.max_model_len or cfg.max_position_embeddings
    if not 1 < limit <= cfg.max_position_embeddings:
        raise bad_value("max_model_len", config.max_model_len,
                        f"must be in 2..{cfg.max_position_embeddings} (the model's max_position_embeddings)")
    if config.speculative and not cfg.num_mtp_modules:
        raise ConfigError("speculative=True needs a model with an MTP module (num_mtp_modules=0 here)")
    return limit


def _allocate_pool(model: PanguProMoEForCausalLM, config: EngineConfig, device: torch.device,
                   mtp: bool = False) -> KVPool:
    """The trunk's pool, or the MTP modules' (one layer each, indexed by trunk position)."""
    layers = model.model.mtp if mtp else model.model.layers
    attn_cfg = layers[0].self_attn.cfg if len(layers) else model.config  # this rank's heads under a plan
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    return KVPool.allocate(attn_cfg, len(layers), config.kv_blocks, config.block_size, dtype, device)


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    gen = torch.Generator()
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    else:
        gen.seed()
    return gen


def _sample(logits_V: Tensor, seq: _Seq) -> int:
    sampling = seq.request.sampling
    if sampling.temperature == 0:
        return int(logits_V.argmax())
    return int(sample_next(logits_V.float().cpu().view(1, -1), sampling, seq.generator)[0])
