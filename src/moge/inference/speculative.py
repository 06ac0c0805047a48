"""Speculative decoding with the model's own multi-token-prediction (MTP) module.

The MTP module (moge.nn.model.MTPModule, DeepSeek-V3 arXiv 2412.19437) predicts token t+2 from the
trunk's hidden state at t and the embedding of token t+1, so after each verified step it has a
guess for the token after next. One iteration:

1. draft: the MTP module proposes d_1 for the position after the last accepted token x. With
   `num_draft` k > 1 it is chained on its own outputs: its pre-norm output at the newest position
   stands in for the trunk's (not yet computed) hidden state, and its draft for the embedding, to
   propose d_2, ..., d_k. The module was trained for one step ahead only, so chained drafts are
   accepted less often (measure with benchmarks/speculative.py).
2. verify: ONE forward of the trunk over [x, d_1, ..., d_k] with the KV cache gives the target
   distributions p_0..p_k for the token after x, after d_1, ..., after d_k.
3. accept the longest prefix of drafts that passes the test, then emit one more token: greedy
   accepts d_j when it is the argmax of p_{j-1}; sampling accepts d_j with probability
   min(1, p_{j-1}(d_j) / q_j(d_j)) and after the first rejection draws from
   norm(max(0, p_{j-1} - q_j)) (Leviathan et al. 2023, "Fast Inference from Transformers via
   Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
   Speculative Sampling"). When every draft passes, a bonus token is drawn from p_k. Each emitted
   token therefore follows the target distribution exactly; p and q both use the same
   temperature / top-k / top-p (moge.inference.generate.sampling_probs).
4. roll back: the trunk's KV cache drops the rejected drafts (KVCache.truncate); the MTP module's
   cache drops its chained guesses and takes the trunk's now known hidden states for the accepted
   positions, which also gives the next draft.

Batches: every row accepts its own number of drafts. The KV caches keep one column layout for
the batch, so the batch keeps as many new columns as the longest accepted run needs and masks
each other row's rejected slots as holes (like left padding: masked in attention, not counted
in positions). Each row thus runs exactly the single-row algorithm, and greedy output is
token-for-token that of `moge.inference.generate.generate` at any batch size. Holes cost cache columns
(at most num_draft + 1 per token); where the cache (capped at max_position_embeddings) could
run short, a step keeps only the shortest accepted run instead, and rows that accepted more emit
their accepted draft at that point - still exact: whether to cut is decided before the tests,
and where a row is cut depends only on the other rows. Batch 1 never has holes.

Ranks in lockstep (a parallel model under torchrun, `all_done` and `agree_min` from
moge.parallel.lockstep): every forward is a collective, so every rank must make the same forward
calls. Each rank decodes its own rows with its own caches (their lengths may differ: under expert
parallelism the token dispatch tolerates different token counts per rank), but per step the ranks
agree on the number of drafts k (the smallest any running rank needs) and on the columns kept K
(the smallest any rank keeps: a row that accepted more stops at K, exactly as when holes would not
fit, so the output stays exact). A rank whose rows are all done keeps stepping on throw-away input,
its caches cut back to the prompt each step, until every rank is done.

Greedy output equals plain greedy decoding up to floating-point near-ties: the verify pass
computes several positions in one matmul, whose rounding can differ from one-token steps in the
last bit, exactly as a padded batch in `generate` can.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moge.errors import ConfigError
from moge.inference.generate import GenerationResult, Sampling, check_prompts, left_pad, sample_next, sampling_probs
from moge.nn.model import KVCache, PanguProMoEForCausalLM
from moge.nn.moe import LocalDispatcher, MoGEBlock


@dataclass
class SpeculativeResult(GenerationResult):
    """`GenerationResult` plus draft statistics. `decode_steps` counts trunk verify passes."""

    num_draft: int = 1
    drafted: int = 0  # draft tokens proposed to unfinished rows
    accepted: int = 0  # of those, accepted by each row's own test (leading run only)
    emitted_drafts: int = 0  # accepted drafts emitted (a batch advances by its rows' minimum)
    row_steps: int = 0  # verify passes summed over the rows still running

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (nan when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a running row gains per verify pass (1 = no gain over plain decoding)."""
        return (self.new_tokens - len(self.tokens)) / self.row_steps if self.row_steps else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each row's first (which comes from the prefill) per second of decoding; the
        MTP module's pass over the prompt is counted as decoding time."""
        produced = self.new_tokens - len(self.tokens)
        return produced / self.decode_s if self.decode_s > 0 else float("nan")


def _check_inputs(model: PanguProMoEForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  num_draft: int) -> None:
    cfg = model.config
    if not cfg.num_mtp_modules:
        raise ConfigError("speculative decoding needs a model with an MTP module (num_mtp_modules=1, config.json "
                         "key num_nextn_predict_layers); train one with `moge train --mtp --mtp-weight 0.3`")
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ConfigError(f"num_draft={num_draft!r} is invalid: must be an integer >= 1 (draft tokens per step)")
    check_prompts(cfg, prompts, max_new_tokens)
    trunk_split = any(not isinstance(m.dispatcher, LocalDispatcher) for m in model.model.layers.modules()
                      if isinstance(m, MoGEBlock))
    mtp_whole = any(isinstance(m.dispatcher, LocalDispatcher) for m in model.model.mtp.modules()
                    if isinstance(m, MoGEBlock))
    if trunk_split and mtp_whole:
        raise ConfigError("speculative decoding needs the MTP module split like the trunk: this model's trunk is "
                          "parallelized and its MTP module is whole; apply the parallel plan to the whole model "
                          "(moge.parallel.parallelize splits the MTP module under ExpertParallel and H2P)")


def _local(done: bool) -> bool:
    return done


def _same(value: int) -> int:
    return value


def _draw(weights_BV: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.multinomial(weights_BV, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def speculative_generate(model: PanguProMoEForCausalLM, prompts: Sequence[Sequence[int]], *,
                         max_new_tokens: int = 32, sampling: Sampling = Sampling(),
                         stop_ids: Sequence[int] | None = None,
                         on_token: Callable[[int, int], None] | None = None,
                         num_draft: int = 1, all_done: Callable[[bool], bool] | None = None,
                         agree_min: Callable[[int], int] | None = None) -> SpeculativeResult:
    """`moge.inference.generate.generate` with MTP drafts verified by the trunk: same arguments, same stop
    and length rules, same output for greedy decoding and the same distribution when sampling.
    `num_draft` tokens are drafted per step (more than 1 chains the MTP module).

    A parallel model's ranks must run every forward together: pass
    `moge.parallel.lockstep.all_ranks_done` as `all_done` and `moge.parallel.lockstep.min_over_ranks`
    as `agree_min` (the minimum of an integer over the ranks), as `generate` takes `all_done`."""
    _check_inputs(model, prompts, max_new_tokens, num_draft)
    cfg = model.config
    stop = set(stop_ids if stop_ids is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else []))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    pad = cfg.pad_token_id or 0
    ids, mask = left_pad(prompts, pad, device)
    padded = bool((mask == 0).any())
    # Rows accept different numbers of drafts; a batch keeps the rejected slots of the rows that
    # accepted fewer as masked holes, so it needs more cache columns than tokens (at most
    # num_draft + 1 per new token). Batch 1 never has holes.
    max_len = longest + max_new_tokens * (num_draft + 1 if B > 1 else 1)
    max_len = max(longest + max_new_tokens, min(max_len, cfg.max_position_embeddings))
    cache = model.allocate_cache(B, max_len, dtype, device)  # this rank's heads under a parallel plan
    mtp_attn = model.model.mtp[0].self_attn.cfg
    mtp_cache = KVCache.allocate(mtp_attn.replace(num_layers=cfg.num_mtp_modules), B, max_len, dtype, device)
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    greedy = sampling.temperature == 0
    rows = torch.arange(B, device=device)
    finished = all_done or _local
    agree = agree_min or _same

    tokens: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stats = {"drafted": 0, "accepted": 0, "emitted_drafts": 0, "row_steps": 0}

    def emit(blocks: list[list[int]]) -> None:
        for row, toks in enumerate(blocks):
            if done[row]:
                continue
            for tok in toks:
                tokens[row].append(tok)
                if on_token is not None:
                    on_token(row, tok)
                if tok in stop or len(tokens[row]) >= max_new_tokens:
                    done[row] = True
                    break

    t0 = time.perf_counter()
    out = model(ids, cache=cache, attention_mask=mask if padded else None, logits_slice=slice(-1, None))
    last = sample_next(out.logits[:, -1], sampling, gen)  # exactly as generate(): same first token
    t1 = time.perf_counter()
    emit([[t] for t in last.tolist()])
    steps = 0
    stopped = finished(all(done))
    if not stopped:
        # the MTP module over the prompt: position t sees h_t and the token at t+1
        following = torch.cat([ids[:, 1:], last.view(B, 1)], dim=1)
        mtp_out = model.mtp_forward(out.pre_norm_hidden, following, cache=mtp_cache,
                                    attention_mask=mask if padded else None, logits_slice=slice(-1, None))
        q_logits, q_hidden = mtp_out.logits[:, -1], mtp_out.pre_norm_hidden[:, -1:]
    while not stopped:
        active = [row for row in range(B) if not done[row]]
        remaining = {row: max_new_tokens - len(tokens[row]) for row in active}
        if not active:  # waiting for other ranks: throw-away steps from the prompt's end
            cache.truncate(min(cache.length, longest))
            mtp_cache.truncate(min(mtp_cache.length, longest))
        # the verify pass may emit k + 1 tokens; in lockstep every rank drafts the smallest k a rank needs
        k = agree(min(num_draft, max(remaining.values()) - 1) if active else num_draft)
        # worst case with holes: one row keeps all k + 1 columns, another gains one token
        holes_fit = cache.length + k + max(remaining.values(), default=1) <= cache.max_len
        # 1. draft (chained steps use the module's own output as the hidden state)
        base = mtp_cache.length
        drafts: list[Tensor] = []
        q_list: list[Tensor] = []
        for j in range(k):
            if j:
                chained = model.mtp_forward(q_hidden, drafts[-1].view(B, 1), cache=mtp_cache)
                q_logits, q_hidden = chained.logits[:, -1], chained.pre_norm_hidden
            if greedy:
                drafts.append(q_logits.argmax(-1))
            else:
                q = sampling_probs(q_logits, sampling)
                q_list.append(q)
                drafts.append(_draw(q, gen))
        mtp_cache.truncate(base)  # chained guesses are redone from the trunk's hidden states below
        drafts_BK = torch.stack(drafts, dim=1) if drafts else last.new_zeros(B, 0)
        # 2. verify: one trunk pass over the last token and the drafts
        start = cache.length
        ver = model(torch.cat([last.view(B, 1), drafts_BK], dim=1), cache=cache)
        # 3. accept: each row's leading run of drafts that pass
        if greedy:
            target_BK1 = ver.logits.argmax(-1)
            passed = drafts_BK == target_BK1[:, :k]
        else:
            V = ver.logits.shape[-1]
            p = sampling_probs(ver.logits.reshape(B * (k + 1), V), sampling).view(B, k + 1, V)
            if k:
                q_BKV = torch.stack(q_list, dim=1)
                p_d = p[:, :k].gather(-1, drafts_BK.unsqueeze(-1)).squeeze(-1)
                q_d = q_BKV.gather(-1, drafts_BK.unsqueeze(-1)).squeeze(-1)
                u = torch.rand(B, k, generator=gen, device=device)
                passed = u * q_d < p_d  # u < min(1, p/q); q_d > 0 since d was drawn from q
            else:
                passed = torch.zeros(B, 0, dtype=torch.bool, device=device)
        run = passed.long().cumprod(-1).sum(-1).tolist() if k else [0] * B
        # The batch keeps K + 1 of the k + 1 new columns: K = the longest accepted run, the other
        # rows' rejected slots become holes - unless holes could leave too few cache columns to
        # finish (decided from the worst case, before any test); then K = the shortest run (no
        # holes; rows that accepted more stop at K + 1).
        if active:
            K = max(run[row] for row in active) if holes_fit else min(run[row] for row in active)
        else:
            K = k
        K = agree(K)  # in lockstep: the fewest columns any rank keeps (rows past it stop at K)
        acc = [min(r, K) for r in run]
        acc_B = torch.tensor(acc, device=device)
        if greedy:
            nxt = target_BK1[rows, acc_B]
        else:
            p_next = p[rows, acc_B]  # the target distribution after each row's accepted drafts
            if k:
                residual = (p_next - q_BKV[rows, acc_B.clamp(max=k - 1)]).clamp_min(0)
                # a rejection: norm(max(0, p - q)) (p itself if p == q up to rounding); all drafts
                # accepted: a bonus token from p
                use_p = (acc_B == k).unsqueeze(-1) | (residual.sum(-1, keepdim=True) <= 0)
                nxt = _draw(torch.where(use_p, p_next, residual), gen)
            else:
                nxt = _draw(p_next, gen)
        if K < k:  # rows whose run went past K emit their accepted draft at K
            further = torch.tensor([r > K for r in run], device=device)
            nxt = torch.where(further, drafts_BK[:, K], nxt)
        drafts_list, nxt_list = drafts_BK.tolist(), nxt.tolist()
        blocks = [drafts_list[row][:acc[row]] + [nxt_list[row]] for row in range(B)]
        # 4. roll back: drop the columns no row kept, mask each row's rejected slots
        cache.truncate(start + K + 1)
        kept_B = torch.arange(K + 1, device=device).unsqueeze(0) <= acc_B.unsqueeze(1)  # [B, K + 1]
        cache.hide(start, kept_B)
        stats["drafted"] += k * len(active)
        stats["accepted"] += sum(run[row] for row in active)
        stats["emitted_drafts"] += sum(acc[row] for row in active)
        stats["row_steps"] += len(active)
        steps += 1 if active else 0
        emit(blocks)
        stopped = finished(all(done))
        if stopped:
            break
        # the MTP module over the kept columns: the trunk's hidden states and each row's next tokens
        following = torch.tensor([b + [pad] * (K + 1 - len(b)) for b in blocks], device=device)
        holes = bool((~kept_B).any())
        if holes:  # each row's next draft comes from its own last kept column
            mtp_out = model.mtp_forward(ver.pre_norm_hidden[:, :K + 1], following, cache=mtp_cache,
                                        attention_mask=kept_B.long())
            q_logits, q_hidden = mtp_out.logits[rows, acc_B], mtp_out.pre_norm_hidden[rows, acc_B].unsqueeze(1)
        else:  # every row kept all K + 1 columns: only the last one needs logits
            mtp_out = model.mtp_forward(ver.pre_norm_hidden[:, :K + 1], following, cache=mtp_cache,
                                        logits_slice=slice(-1, None))
            q_logits, q_hidden = mtp_out.logits[:, -1], mtp_out.pre_norm_hidden[:, -1:]
        last = nxt
    t2 = time.perf_counter()
    return SpeculativeResult(tokens, sum(len(p) for p in prompts), t1 - t0, t2 - t1, steps,
                             [bool(t and t[-1] in stop) for t in tokens], num_draft=num_draft, **stats)
