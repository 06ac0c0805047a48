"""The Pangu Pro MoE decoder in plain PyTorch, readable top to bottom.

    tokens -> embed_tokens -> [DecoderLayer x L] -> norm -> lm_head -> fp32 logits
    DecoderLayer: h + Attention(RMSNorm(h)), then h + MoGEBlock(RMSNorm(h))  (pre-norm only)

Attention is GQA with biases on q, k, v and o, RoPE over the full head dim (rotate-half), causal
`scaled_dot_product_attention`. The MLP is a MoGEBlock (or a dense SwiGLU when the config has no
experts). Parameter names follow the release (`model.layers.{i}.self_attn.q_proj.weight`, ...);
only the routed experts are stacked, and moge.checkpoint.layout maps them to the per-expert keys.
An optional multi-token-prediction module (`MTPModule`, `model.mtp.0.*`, `mtp_forward`) predicts
token t+2 for MTP training and speculative decoding (moge.inference.speculative).

The forward copies nothing from the device to the host, so it runs ahead in an accelerator's queue
and `torch.compile` traces it whole: the attention mask is chosen from host facts (was a padding
mask passed, has the cache seen one), RoPE reads cached tables, and id checks are device-side
asserts except in eager CPU runs (see `check_range`). Callers validate at their boundary
(generate checks every prompt before the first forward).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.config import ModelConfig
from moge.nn.experts import SwiGLUExperts, linear
from moge.nn.moe import Linear, MoGEBlock, SwiGLU
from moge.nn.paged import PagedBatch
from moge.nn.routing import RoutingResult


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def check_range(values: Tensor, high: int, what: str, valid: str) -> None:
    """Every value must be in 0..high-1; checked without a host sync.

    Eager CPU checks right away (reading a CPU tensor needs no sync) and raises ValueError naming
    the first bad value: "{what} {value} is out of range: {valid}". On accelerators and under
    torch.compile it is a device-side assert (`torch._assert_async`): no sync, no graph break; the
    failure surfaces as a RuntimeError at the next synchronisation."""
    if values.device.type == "cpu" and not torch.compiler.is_compiling():
        outside = (values < 0) | (values >= high)
        if bool(outside.any()):
            raise ConfigError(f"{what} {int(values[outside][0])} is out of range: {valid}")
        return
    torch._assert_async(((values >= 0) & (values < high)).all(), f"a {what} is out of range: {valid}")


# (head_dim, theta, positions, device, dtype) -> cos/sin [positions, head_dim]; see `rope_tables`
_ROPE_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def rope_tables(head_dim: int, theta: float, max_positions: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos/sin [max_positions, head_dim] (rotate-half layout) for positions 0..max_positions-1.

    Built once per (device, dtype) and kept for the life of the process, so a forward only gathers
    rows (2 x 64 MB for Pangu Pro MoE's 131072 positions x 128 dims). The angles are computed in
    float64 on the CPU (a float32 angle is off by up to ~1e-2 rad at position 10^5) and rounded
    once to `dtype`: the same numbers as computing them per call."""
    key = (head_dim, float(theta), max_positions, device, dtype)
    tables = _ROPE_TABLES.get(key)
    if tables is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.arange(max_positions, dtype=torch.float64).unsqueeze(-1) * inv_freq  # [P, hd/2]
        angles = torch.cat([angles, angles], dim=-1)
        tables = (angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype))
        _ROPE_TABLES[key] = tables
    return tables


def rope_cos_sin(positions_BS: Tensor, head_dim: int, theta: float, max_positions: int) -> tuple[Tensor, Tensor]:
    """cos/sin [B, 1, S, head_dim] fp32 for the given positions (each in 0..max_positions-1)."""
    cos_PH, sin_PH = rope_tables(head_dim, theta, max_positions, positions_BS.device)
    return cos_PH[positions_BS].unsqueeze(1), sin_PH[positions_BS].unsqueeze(1)


def apply_rope(x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x_BHSd.shape[-1] // 2
    rotated = torch.cat([-x_BHSd[..., half:], x_BHSd[..., :half]], dim=-1)
    return (x_BHSd.float() * cos + rotated.float() * sin).to(x_BHSd.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: [L, B, H_kv, max_len, head_dim] each.

    `length` tokens are filled for every row (left padding keeps rows aligned); `valid_BT` marks
    which cached slots are real tokens (False for padding), for the attention mask. `padded` is the
    host's record that a padding mask was ever passed, so a decode step knows without reading
    `valid_BT` whether it needs a mask.
    """

    k: Tensor
    v: Tensor
    valid_BT: Tensor
    length: int = 0
    padded: bool = False

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_size)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k_BHSd: Tensor, v_BHSd: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        start, end = self.length, self.length + k_BHSd.shape[2]
        self.k[layer, :, :, start:end] = k_BHSd
        self.v[layer, :, :, start:end] = v_BHSd
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, tokens: int, valid_new_BS: Tensor) -> None:
        """After every layer has stored the step: record which new slots are real tokens."""
        self.valid_BT[:, self.length:self.length + tokens] = valid_new_BS
        self.length += tokens

    def hide(self, start: int, keep_BS: Tensor) -> None:
        """Turn the cached slots from `start` on where `keep_BS` is False into padding (speculative
        decoding's rejected drafts): every later step masks them out."""
        self.valid_BT[:, start:start + keep_BS.shape[1]] &= keep_BS
        self.padded = True

    def attend(self, layer: int, q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask: Tensor | None) -> Tensor:
        """Store this step's keys/values for `layer` and attend the queries to every cached position."""
        k, v = self.update(layer, k_BHSd, v_BHSd)
        return sdpa(q_BHSd, k, v, mask)

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding drops rejected drafts this way).
        The keys/values left behind are never read: the next `update` overwrites them first."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"length={length} is invalid: must be in [0, {self.length}] (the cached length)")
        self.valid_BT[:, length:self.length] = False
        self.length = length


@dataclass
class CacheSlot:
    """One decode step into a KVCache at slot `slot_1` (a one-element tensor): the step's keys and
    values go to that slot and its queries attend to the cache's whole preallocated length under
    `mask_B11T` (the real tokens so far and the new one). Every step has the same shapes and no
    Python number that changes, so torch.compile traces one graph for all of them (the static
    cache of gpt-fast); `PanguProMoEForCausalLM.decode_step` builds it."""

    cache: KVCache
    slot_1: Tensor
    mask_B11T: Tensor

    def attend(self, layer: int, q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask: Tensor | None) -> Tensor:
        # one index_put_ into the whole [L, B, H, T, d] tensor, not a write through the view
        # k[layer]: torch.compile turns a view's in-place write into a copy of the whole cache
        # (measured: 25 ms of a batch-16 step), and this one into an in-place scatter
        at = (torch.tensor([layer], device=self.slot_1.device), slice(None), slice(None), self.slot_1)
        self.cache.k[at] = k_BHSd.permute(2, 0, 1, 3).to(self.cache.k.dtype)
        self.cache.v[at] = v_BHSd.permute(2, 0, 1, 3).to(self.cache.v.dtype)
        return sdpa(q_BHSd, self.cache.k[layer], self.cache.v[layer], self.mask_B11T)


def sdpa(q_BHSd: Tensor, k_BHCd: Tensor, v_BHCd: Tensor, mask: Tensor | None) -> Tensor:
    """Causal attention (GQA when the key heads are fewer): with `mask` when one is given, else plain
    causal for several queries, and unmasked for one."""
    S = q_BHSd.shape[2]
    is_causal = True if mask is None and S > 1 else False  # a Python bool even when S is symbolic
    return F.scaled_dot_product_attention(q_BHSd, k_BHCd, v_BHCd, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q_BHSd.shape[1] != k_BHCd.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd, h, kv = cfg.head_size, cfg.num_heads, cfg.num_kv_heads
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, h * hd, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, kv * hd, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, kv * hd, bias=bias)
        self.o_proj = Linear(h * hd, cfg.hidden_size, bias=bias)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int,
                cache: KVCache | PagedBatch | CacheSlot | None) -> Tensor:
        B, S, _ = x_BSD.shape
        hd, h, kv = self.cfg.head_size, self.cfg.num_heads, self.cfg.num_kv_heads
        q = self.q_proj(x_BSD).view(B, S, h, hd).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, kv, hd).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = sdpa(q, k, v, mask)
        else:  # the cache stores the new keys/values and attends over everything it holds
            out = cache.attend(layer, q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, h * hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoGEBlock(cfg.moe()) if cfg.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int,
                cache: KVCache | PagedBatch | CacheSlot | None) -> tuple[Tensor, RoutingResult | None]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, layer, cache)
        if isinstance(self.mlp, MoGEBlock):
            out, routing = self.mlp(self.post_attention_layernorm(h), return_routing=True)
        else:
            out, routing = self.mlp(self.post_attention_layernorm(h)), None
        return h + out, routing


class MTPModule(DecoderLayer):
    """One multi-token-prediction module (DeepSeek-V3, arXiv 2412.19437, Sec. 2.2, Eqs. 21-22).

    For position t it combines the trunk's hidden state h_t with the embedding of token t+1,
        h'_t = eh_proj([hnorm(h_t); enorm(Emb(x_{t+1}))])        (a D x 2D projection)
    runs one decoder layer over the sequence of h' (its own causal attention, its own KV cache
    slot), and the caller applies `norm` and the shared lm_head to predict token t+2.

    h_t is the trunk's residual stream after the last decoder layer and *before* the final norm:
    the paper's h^0 is "the representation given by the main model" and the module normalises it
    itself (hnorm), so feeding the post-norm state would only put the final norm's per-channel gain
    in front of hnorm. The pre-norm output of this module is what a chained prediction (t+3, ...)
    takes as its h. The concatenation order (hidden first) follows the paper's Eq. 21.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, emb: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, layer: int,
                cache: KVCache | PagedBatch | CacheSlot | None) -> tuple[Tensor, RoutingResult | None]:
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))
        return super().forward(x, cos, sin, mask, layer, cache)


class PanguProMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # empty without MTP: no parameters, the state dict is unchanged
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_mtp_modules))


@dataclass
class ModelOutput:
    logits: Tensor  # [B, S, V] fp32
    routing: list[RoutingResult] | None = None
    hidden: Tensor | None = None  # final normed hidden states [B, S, D]
    pre_norm_hidden: Tensor | None = None  # before the final norm, all S positions [B, S, D] (MTP input)


class PanguProMoEForCausalLM(nn.Module):
    """The whole model. `forward(input_ids)` for training/scoring; with a KVCache for generation."""

    # A parallel plan whose residual stream is a shard of the tokens (H2P) sets this to the function
    # that gathers it into [B, S, D] before the final norms, so pre_norm_hidden is whole as here.
    gather_hidden = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = PanguProMoEModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, *, positions: Tensor | None = None,
                cache: KVCache | PagedBatch | CacheSlot | None = None,
                attention_mask: Tensor | None = None, return_routing: bool = False,
                logits_slice: slice | Tensor | None = None) -> ModelOutput:
        """input_ids [B, S]. `attention_mask` [B, S] (1 = token, 0 = left padding) is needed only for
        padded batches; `positions` default to 0.. for each row's real tokens. `logits_slice`
        restricts the lm_head to some positions (e.g. the last one during generation; a LongTensor of
        positions picks several). With a `PagedBatch` as `cache` (moge.nn.paged) input_ids is the
        flat [1, T] row of a step's sequences and positions come from the batch."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        check_range(input_ids, cfg.vocab_size, "token id",
                    f"valid ids are 0..{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size})")
        past, valid_BT, mask, cos, sin = attention_inputs(cfg, B, S, positions, cache, attention_mask,
                                                          input_ids.device)
        h = self.model.embed_tokens(input_ids)
        routings = []
        for i, layer in enumerate(self.model.layers):
            h, routing = layer(h, cos, sin, mask, i, cache)
            routings.append(routing)
        if isinstance(cache, KVCache):
            cache.advance(S, valid_BT[:, past:])
        pre_norm = h if self.gather_hidden is None else self.gather_hidden(h)
        h = self.model.norm(pre_norm)
        if logits_slice is not None:
            h = h[:, logits_slice]
        return ModelOutput(self._logits(h), routings if return_routing else None, h, pre_norm)

    def mtp_forward(self, hidden_BSD: Tensor, next_ids: Tensor, *, module: int = 0, positions: Tensor | None = None,
                    cache: KVCache | PagedBatch | CacheSlot | None = None, attention_mask: Tensor | None = None,
                    return_routing: bool = False, logits_slice: slice | Tensor | None = None) -> ModelOutput:
        """Multi-token prediction: logits for token t+2 at every position t.

        `hidden_BSD` is the trunk's pre-norm hidden state at positions t (`ModelOutput.pre_norm_hidden`,
        or this method's own output when chaining) and `next_ids` [B, S] the tokens at t+1. `cache` is
        the MTP modules' own KVCache (one layer per module, slot j = trunk position j);
        `positions` and `attention_mask` work as in `forward`. Returns the module's logits, its
        normed output (`hidden`) and its pre-norm output (`pre_norm_hidden`)."""
        cfg = self.config
        if not cfg.num_mtp_modules:
            raise ConfigError("this model has no MTP module (num_mtp_modules=0); build it with num_mtp_modules=1")
        if not 0 <= module < cfg.num_mtp_modules:
            raise ConfigError(f"module={module} is invalid: the model has {cfg.num_mtp_modules} MTP module(s)")
        if next_ids.dim() != 2 or hidden_BSD.shape != (*next_ids.shape, cfg.hidden_size):
            raise ConfigError(f"mtp_forward needs hidden [batch, seq, {cfg.hidden_size}] and next_ids [batch, seq], "
                             f"got {tuple(hidden_BSD.shape)} and {tuple(next_ids.shape)}")
        B, S = next_ids.shape
        check_range(next_ids, cfg.vocab_size, "next_ids token id",
                    f"valid ids are 0..{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size})")
        past, valid_BT, mask, cos, sin = attention_inputs(cfg, B, S, positions, cache, attention_mask,
                                                          next_ids.device)
        mtp = self.model.mtp[module]
        h, routing = mtp(hidden_BSD, self.model.embed_tokens(next_ids), cos, sin, mask, module, cache)
        if isinstance(cache, KVCache):
            cache.advance(S, valid_BT[:, past:])
        pre_norm = h if self.gather_hidden is None else self.gather_hidden(h)
        h = mtp.norm(pre_norm)
        if logits_slice is not None:
            h = h[:, logits_slice]
        return ModelOutput(self._logits(h), [routing] if return_routing else None, h, pre_norm)

    def decode_step(self, input_ids_B1: Tensor, slot_1: Tensor, cache: KVCache) -> Tensor:
        """Logits [B, V] of one new token per row, written to `cache` at slot `slot_1` (a one-element
        long tensor, the cache's length), with the same shapes every step (`CacheSlot`): the step
        that moge.inference.compiled compiles once for a whole generation. The same numbers as
        `forward` with the cache, up to summation order: positions count each row's real tokens and
        the mask admits them and the new token. The caller advances `cache.length` afterwards."""
        B = input_ids_B1.shape[0]
        valid_BT = cache.valid_BT
        positions_B1 = valid_BT.sum(-1, keepdim=True)  # real tokens before this one
        valid_BT.index_fill_(1, slot_1, True)
        slots_T = torch.arange(cache.max_len, device=valid_BT.device)
        mask_B11T = (valid_BT & (slots_T <= slot_1)).view(B, 1, 1, cache.max_len)
        out = self(input_ids_B1, positions=positions_B1, cache=CacheSlot(cache, slot_1, mask_B11T))
        return out.logits[:, -1]

    def _logits(self, h: Tensor) -> Tensor:
        """fp32 logits of the normed hidden states. An lm_head that makes them itself (`fp32_logits`:
        a parallel plan's vocabulary-parallel head, whose weight is only a slice) gets h as it is."""
        if h.dtype == torch.float32 or getattr(self.lm_head, "fp32_logits", False):
            return self.lm_head(h)
        return linear(h.float(), self.lm_head.weight.float())

    @staticmethod
    def _valid_tokens(B: int, S: int, past: int, attention_mask: Tensor | None, cache, device) -> Tensor:
        """[B, past+S] bool: which positions hold real tokens (False = padding).

        `attention_mask` may cover the new tokens only ([B, S]) or the whole sequence
        ([B, past+S], the Hugging Face convention); cached history comes from the cache."""
        if attention_mask is not None and attention_mask.shape == (B, past + S) and past:
            return attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} must be {(B, S)} "
                                 f"(new tokens) or {(B, past + S)} (whole sequence)")
            new = attention_mask.to(device=device, dtype=torch.bool)
        else:
            new = torch.ones(B, S, dtype=torch.bool, device=device)
        history = getattr(cache, "valid_BT", None)
        if past == 0:
            return new
        old = history[:, :past] if history is not None else torch.ones(B, past, dtype=torch.bool, device=device)
        return torch.cat([old, new], dim=1)

    @staticmethod
    def _attention_mask(S: int, past: int, valid_BT: Tensor, padded: bool) -> Tensor | None:
        """Boolean SDPA mask [B, 1, S, past+S], or None when plain causal attention is exact.
        `padded` (a host fact: some mask said so) decides, not the values of `valid_BT`."""
        if not padded and (S == 1 or past == 0):
            return None  # one new token sees everything; an unpadded prefill is plain causal
        device = valid_BT.device
        q_pos = torch.arange(past, past + S, device=device).view(1, S, 1)
        k_pos = torch.arange(past + S, device=device).view(1, 1, past + S)
        mask = (k_pos <= q_pos) & valid_BT.unsqueeze(1)
        # a padding query would attend to nothing (NaN); let it see itself, its output is unused
        mask = mask | (k_pos == q_pos)
        return mask.unsqueeze(1)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "PanguProMoEForCausalLM":
        """GPT-style initialisation for training from scratch (see `initial_tensor`). Every parameter
        comes from its own generator, seeded by (seed, name), and every routed expert of a stacked
        expert tensor from (seed, name, expert): a rank of a parallel run makes exactly its share of
        these values without the rest (moge.train.model). Without `seed` one is drawn from torch's
        global generator."""
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        stacked = {id(p) for m in self.modules() if isinstance(m, SwiGLUExperts) for p in m.parameters()}
        for name, p in self.named_parameters():
            experts = range(p.shape[0]) if id(p) in stacked else None
            p.copy_(initial_tensor(name, p.shape, std=std, num_layers=self.config.num_layers, seed=seed,
                                   experts=experts))
        return self

    def allocate_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> KVCache:
        """A KV cache for this model's attention modules: every head, or this rank's heads once a
        parallel plan (moge.parallel.parallelize) has split them."""
        attn_cfg = self.model.layers[0].self_attn.cfg if len(self.model.layers) else self.config
        device = self.lm_head.weight.device if device is None else device
        return KVCache.allocate(attn_cfg, batch, max_len, dtype, device)

    def num_parameters(self) -> dict[str, int]:
        """Total and activated parameter counts of this instance (works on the meta device)."""
        total = sum(p.numel() for p in self.parameters())
        cfg = self.config
        if cfg.is_moe:
            per_expert = 3 * cfg.hidden_size * cfg.expert_intermediate_size
            inactive = (cfg.num_layers + cfg.num_mtp_modules) * (cfg.num_experts - cfg.top_k) * per_expert
        else:
            inactive = 0
        return {"total": total, "activated": total - inactive}


def attention_inputs(cfg: ModelConfig, B: int, S: int, positions: Tensor | None,
                     cache: KVCache | PagedBatch | CacheSlot | None,
                     attention_mask: Tensor | None, device) -> tuple[int, Tensor, Tensor | None, Tensor, Tensor]:
    """For S new tokens of B rows: (past length, valid_BT, SDPA mask, RoPE cos, sin), with clear
    errors when the sequence outgrows the context or the cache. Positions default to each row's
    count of real tokens, so left padding does not shift them. Nothing is read back from the
    device: whether a mask is needed follows from `attention_mask` being given now or before
    (recorded on a KVCache as `padded`)."""
    if isinstance(cache, CacheSlot):  # a static-shape decode step: positions and mask come with it
        cos, sin = rope_cos_sin(positions, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
        return 0, None, cache.mask_B11T, cos, sin
    if isinstance(cache, PagedBatch):  # a flat batch of sequences: positions and masks come with it
        if B != 1 or S != cache.num_tokens:
            raise ConfigError(f"a PagedBatch of {cache.num_tokens} tokens needs input of shape "
                              f"(1, {cache.num_tokens}), got {(B, S)}")
        cos, sin = rope_cos_sin(cache.positions_1T, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
        return 0, None, None, cos, sin
    past = cache.length if cache is not None else 0
    if past + S > cfg.max_position_embeddings:
        raise ConfigError(f"sequence length {past + S} exceeds max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    if cache is not None and past + S > cache.max_len:
        raise ConfigError(f"sequence length {past + S} exceeds the KV cache size {cache.max_len}")
    valid_BT = PanguProMoEForCausalLM._valid_tokens(B, S, past, attention_mask, cache, device)
    if positions is None:
        positions = (valid_BT.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
    else:
        check_range(positions, cfg.max_position_embeddings, "position",
                    f"valid positions are 0..{cfg.max_position_embeddings - 1} (max_position_embeddings)")
    padded = attention_mask is not None or getattr(cache, "padded", False)
    if padded and isinstance(cache, KVCache):
        cache.padded = True
    mask = PanguProMoEForCausalLM._attention_mask(S, past, valid_BT, padded)
    cos, sin = rope_cos_sin(positions, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
    return past, valid_BT, mask, cos, sin


def _generator(seed: int, *key: object) -> torch.Generator:
    """A generator seeded by a hash of (seed, *key): independent streams per parameter / expert."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def initial_tensor(name: str, shape: Sequence[int], *, std: float, num_layers: int, seed: int,
                   experts: range | None = None) -> Tensor:
    """The fp32 initial value of parameter `name` (single-process name and `shape`) of a model
    trained from scratch: normal(0, std) matrices, zero biases, unit norms and router_scale;
    projections that write into the residual stream (o_proj, down_proj) scaled by
    1/sqrt(2 * num_layers) so the residual variance does not grow with depth.
    `experts`: `name` is a stack of routed experts along dim 0 and only these experts' rows are
    made, each expert's block from its own generator, so any range of experts equals the same rows
    of the whole stack bit for bit."""
    rows = tuple(shape) if experts is None else (len(experts), *shape[1:])
    if name.endswith("router_scale") or name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(rows)
    if name.endswith(".bias"):
        return torch.zeros(rows)
    s = std / (2 * num_layers) ** 0.5 if ("o_proj" in name or "down_proj" in name) else std
    if experts is None:
        return torch.randn(rows, generator=_generator(seed, name)).mul_(s)
    out = torch.empty(rows)
    for i, e in enumerate(experts):
        out[i] = torch.randn(rows[1:], generator=_generator(seed, name, e)).mul_(s)
    return out
