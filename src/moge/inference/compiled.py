"""A decode step compiled once with torch.compile and replayed for every new token.

Eager decoding of a small model spends much of each step outside the matrix products: Python,
module calls and one dispatch per small op (norms, RoPE, routing, residual adds). Compiling the
step fuses those ops into a few generated kernels and runs the whole step as one call. The step
must look the same every time, so it runs on a static cache (the gpt-fast recipe): a KV cache
preallocated to a bucketed length and kept by the decoder across generations, the new token's
slot passed as a tensor, attention over the whole cache under a mask
(`PanguProMoEForCausalLM.decode_step`). Prefill stays eager (its length varies per prompt).

The first step of each (batch size, cache length, CPU thread count) compiles, in seconds; every
later step and generation with those reuses the graph. With `--threads auto` the tuner tries 1, 2,
... threads, so a CPU generation compiles once per count it tries. So compile pays for long or repeated
generation, not for a one-off handful of tokens, and it is opt-in (`moge generate --compile`,
`generate(..., compile=True)`). On CUDA with bfloat16 weights it also captures the step as a CUDA
graph (mode="reduce-overhead"), which removes the launch of each small kernel: measured on an H200,
moge-small's batch-1 step went from 10.5 ms eager to 1.0 ms (docs/benchmarks.md).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.nn.model import KVCache

CACHE_BUCKET = 256  # cache lengths round up to a multiple of this, so nearby lengths share a graph


class CompiledDecoder:
    """`decoder(ids_B1, cache) -> logits [B, V]`: one compiled decode step that advances `cache`.

    `cache_for(batch, length)` hands out the decoder's own cache for a generation (reused across
    generations of the same bucket, its contents reset), which the eager prefill fills first."""

    def __init__(self, model: nn.Module, mode: str | None = None):
        if hasattr(model, "global_slices"):
            raise ConfigError("compiled decoding runs single-process models; this one is split by a parallel plan "
                              "(moge.parallel), whose collectives torch.compile does not trace here")
        self._model = weakref.ref(model)  # the registry below maps the model to this decoder
        device = next(model.parameters()).device
        if mode is None:  # CUDA graphs where every op can be captured: torch's grouped_mm runs bf16
            # natively on CUDA, other dtypes through a fallback that copies to the host (not capturable)
            dtype = next(model.parameters()).dtype
            mode = "reduce-overhead" if device.type == "cuda" and dtype == torch.bfloat16 else "default"
        self.mode = mode
        # torch.compile keeps its graphs per code object, at most recompile_limit (8) of them: a
        # copy of the step's code per decoder gives each model its own budget of graphs
        step = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, "_decode_step")
        self._step = torch.compile(step, dynamic=False, mode=mode)
        self._caches: dict[tuple, KVCache] = {}
        # (cache, thread count) pairs whose generation has run a step with every guard checked
        self._checked: set[tuple[int, int]] = set()

    def cache_for(self, batch: int, length: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """An empty KV cache of at least `length` slots for `batch` rows (bucketed, reused)."""
        model = self._model()
        cfg = model.config
        if length > cfg.max_position_embeddings:
            raise ConfigError(f"sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        size = min(-(-length // CACHE_BUCKET) * CACHE_BUCKET, cfg.max_position_embeddings)
        key = (batch, size, dtype, str(device))
        cache = self._caches.get(key)
        if cache is None:
            cache = model.allocate_cache(batch, size, dtype, device)
            if torch.device(device).type == "cuda":  # CUDA graphs write the cache in place, at fixed addresses
                for t in (cache.k, cache.v, cache.valid_BT):
                    torch._dynamo.mark_static_address(t)
            self._caches = {key: cache}  # one live cache: a new shape frees the last one
        else:
            cache.valid_BT.zero_()
            cache.length, cache.padded = 0, False
        self._checked = {c for c in self._checked if c[0] != id(cache)}
        return cache

    def __call__(self, input_ids_B1: Tensor, cache: KVCache) -> Tensor:
        if cache.length >= cache.max_len:
            raise ConfigError(f"sequence length {cache.length + 1} exceeds the KV cache size {cache.max_len}")
        slot_1 = torch.tensor([cache.length], device=input_ids_B1.device)
        key = (id(cache), torch.get_num_threads())  # the thread count is part of a CPU graph
        model = self._model()
        logits = None
        if key in self._checked:
            # Later steps of a generation: same model, cache, shapes and thread count as a step whose
            # guards all passed. Checking them again (every parameter's metadata) cost 0.5 ms of a
            # 6 ms int4 step on 2 CPU threads; only the guards that tell compiled graphs apart run.
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    logits = self._step(model, input_ids_B1, slot_1, cache)
            except RuntimeError as e:  # it wanted to compile after all: run it with every guard
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        if logits is None:
            logits = self._step(model, input_ids_B1, slot_1, cache)
            self._checked.add(key)
        cache.length += 1
        if cache.k.device.type == "cuda":  # the graph's output buffer is reused by the next replay
            logits = logits.clone()
        return logits


def _decode_step(model: nn.Module, input_ids_B1: Tensor, slot_1: Tensor, cache: KVCache) -> Tensor:
    return model.decode_step(input_ids_B1, slot_1, cache)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decoder(model: nn.Module) -> CompiledDecoder:
    """The model's compiled decoder, made on first use and kept for the model's lifetime."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = CompiledDecoder(model)
    return decoder
