"""Generation: batched prefill into a preallocated KV cache, then one token per step.

Prompts of different lengths are left-padded so every row's next token sits in the same column;
the attention mask hides the padding and positions count only real tokens, so a padded batch
gives the same tokens as running each prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moge.errors import ConfigError
from moge.config import ModelConfig
from moge.inference.compiled import compiled_decoder
from moge.inference.threads import FixedThreads, ThreadTuner
from moge.nn.model import KVCache, PanguProMoEForCausalLM


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is invalid: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is invalid: must be in (0, 1]")


def sample_next(logits_BV: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [B] from fp32 logits: greedy, or temperature + top-k + top-p sampling."""
    if sampling.temperature == 0:
        return logits_BV.argmax(-1)
    probs = sampling_probs(logits_BV, sampling)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits_BV: Tensor, sampling: Sampling) -> Tensor:
    """The distribution `sample_next` draws from ([B, V], temperature > 0): softmax of the
    temperature-scaled logits after the top-k and top-p filters."""
    if sampling.temperature == 0:
        raise ConfigError("sampling_probs needs temperature > 0 (temperature 0 is greedy: argmax)")
    logits = logits_BV.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (stop token included when hit)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    finished: list[bool] = field(default_factory=list)
    threads: dict | None = None  # the decode loop's thread counts (moge.inference.threads summary)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode steps (all rows) per second of decoding."""
        produced = self.decode_steps * len(self.tokens)
        return produced / self.decode_s if self.decode_s > 0 else float("nan")


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Clear errors for prompts a model cannot continue: empty, too long, out-of-vocabulary ids."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty token id lists")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the context of "
                         f"{cfg.max_position_embeddings} tokens (max_position_embeddings)")
    for row, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ConfigError(f"prompt {row}: token id {bad[0]} is out of range: valid ids are 0..{cfg.vocab_size - 1}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Prompts as one left-padded batch: ids [B, longest] and attention mask [B, longest] (1 = token),
    so every row's last prompt token sits in the last column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids, mask


def _local(done: bool) -> bool:
    return done


@torch.inference_mode()
def generate(model: PanguProMoEForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             sampling: Sampling = Sampling(), stop_ids: Sequence[int] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             all_done: Callable[[bool], bool] | None = None,
             threads: ThreadTuner | FixedThreads | None = None, compile: bool = False) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt. `on_token(row, token_id)` streams tokens.
    A row stops at any of `stop_ids` (default: the config's eos_token_id). `threads` runs the
    decode steps (`moge.inference.threads.decode_threads`: tuned by timing, or fixed); default:
    torch's current thread count.

    `compile` runs the decode steps as one torch.compile'd step on a static cache
    (moge.inference.compiled): the first generation of a batch size compiles (seconds), later
    steps and generations reuse it.

    `all_done(done) -> bool` decides when decoding ends, given whether this call's rows are all
    done (default: when they are). The ranks of a parallel model must step together: pass
    `moge.parallel.lockstep.all_ranks_done` so each rank decodes until every rank's rows are done."""
    cfg = model.config
    check_prompts(cfg, prompts, max_new_tokens)
    longest = max(len(p) for p in prompts)
    stop = set(stop_ids if stop_ids is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else []))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    ids, mask = left_pad(prompts, cfg.pad_token_id or 0, device)
    padded = bool((mask == 0).any())
    decoder = compiled_decoder(model) if compile else None
    # the attention modules' own heads: all of them, or this rank's after moge.parallel's H2P plan
    allocate = getattr(model, "allocate_cache", None)
    if decoder is not None:
        cache = decoder.cache_for(B, longest + max_new_tokens, dtype, device)
    elif allocate is not None:
        cache = allocate(B, longest + max_new_tokens, dtype, device)
    else:
        cache = KVCache.allocate(cfg, B, longest + max_new_tokens, dtype, device)

    def step(ids: Tensor) -> Tensor:
        logits = decoder(ids.view(B, 1), cache) if decoder is not None else \
            model(ids.view(B, 1), cache=cache).logits[:, -1]
        return sample_next(logits, sampling, gen)

    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    runner = threads or FixedThreads()

    t0 = time.perf_counter()
    out = model(ids, cache=cache, attention_mask=mask if padded else None, logits_slice=slice(-1, None))
    next_ids = sample_next(out.logits[:, -1], sampling, gen)
    t1 = time.perf_counter()
    tokens: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    steps = 0
    while True:
        for row, tok in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            tokens[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
            if tok in stop or len(tokens[row]) >= max_new_tokens:
                done[row] = True
        if (all_done or _local)(all(done)):
            break
        next_ids = runner.run(lambda ids=next_ids: step(ids))
        steps += 1
    t2 = time.perf_counter()
    return GenerationResult(tokens, sum(len(p) for p in prompts), t1 - t0, t2 - t1, steps,
                            [bool(t and t[-1] in stop) for t in tokens], runner.summary())
