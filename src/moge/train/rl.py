"""GRPO (`moge rl`): group-relative policy optimisation with the zero-advantage mask and a pass-rate
curriculum, on the training loop of `Trainer`.

One step: choose `prompts_per_step` prompts (the curriculum prefers prompts whose estimated pass
rate is neither 0 nor 1), sample `group_size` completions of each with the project's batched
KV-cache generation (`moge.inference.generate`), score them with the reward functions
(`moge.train.rewards`), normalise the rewards within each group (advantage = (r - mean) / (std +
eps), population std), then take `updates_per_batch` optimizer steps on the clipped surrogate

    loss = mean over kept tokens of  -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL

with ratio = pi / pi_old per token and KL the k3 estimate against the frozen starting model (only
built when kl_coef > 0). The zero-advantage mask (on by default) drops every group whose rewards are
all equal from the loss and from its token count: such groups carry no preference, and averaging
their tokens in only shrinks the gradient of the informative groups, while the KL term keeps pulling
them toward the reference (behaviour cloning). A step whose groups are all masked makes no update;
it is logged and the run goes on. Balance (Imbalance Score, device max/mean) is logged from the
routing of the update's forward, as in pretraining.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moge.errors import ConfigError
from moge.inference.generate import Sampling, generate
from moge.inference.tokenizer import Tokenizer, chat_prompt, load_tokenizer
from moge.train.chat import messages_of, read_jsonl
from moge.train.config import TrainConfig, TrainingError
from moge.train.optim import phase_lr
from moge.train.rewards import REWARDS, Reward, resolve
from moge.train.step import routing_losses
from moge.train.trainer import Trainer


@dataclass
class RLConfig(TrainConfig):
    """A TrainConfig for GRPO; batch_size and seq_len are unused (prompts_per_step x group_size is the batch)."""

    prompts: str = ""
    steps: int = 40
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 0
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    updates_per_batch: int = 2
    zero_adv_mask: bool = True
    curriculum: bool = True
    curriculum_pool: int = 32
    curriculum_samples: int = 4
    curriculum_every: int = 10
    rewards: list[str] = field(default_factory=lambda: ["correct=1", "format=0.1", "repetition=0.1"])
    pass_reward: str = "correct"
    save_every: int = 20
    keep_checkpoints: int = 3
    eval_every: int = 1_000_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init:
            raise ConfigError("rl needs init: the checkpoint to start from (--init CKPT)")
        if not self.prompts:
            raise ConfigError("rl needs prompts: a JSONL file of {messages, answer} (--prompts FILE)")
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch", "curriculum_pool",
                     "curriculum_samples", "curriculum_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}={v!r} is invalid: must be a positive integer")
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size} is invalid: GRPO compares samples, use >= 2")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: sampling needs > 0")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps={self.clip_eps} is invalid: must be in (0, 1)")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef} is invalid: must be >= 0")
        if self.pass_reward not in REWARDS:
            raise ConfigError(f"pass_reward={self.pass_reward!r} is invalid: choose one of {', '.join(REWARDS)}")
        if self.phases or self.mtp_loss_weight:
            raise ConfigError("phases and mtp_loss_weight are not supported by rl")


# ---- the pure parts -------------------------------------------------------------------------------

def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [P, G] = (r - group mean) / (group population std + eps), and keep [P] = whether the
    group's rewards differ (False: the zero-advantage mask drops the group)."""
    mean = rewards_PG.mean(1, keepdim=True)
    std = rewards_PG.std(1, unbiased=False, keepdim=True)
    keep = rewards_PG.max(1).values > rewards_PG.min(1).values
    return (rewards_PG - mean) / (std + eps), keep


def grpo_loss(logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, adv_N: torch.Tensor, tokens_NT: torch.Tensor, *,
              clip_eps: float, ref_logp_NT: torch.Tensor | None = None,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate (+ k3 KL) averaged over the tokens where `tokens_NT` is True."""
    ratio = torch.exp(logp_NT - old_logp_NT)
    adv = adv_N.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    m = tokens_NT.to(logp_NT.dtype)
    count = m.sum().clamp_min(1)
    stats = {"clip_fraction": float((((ratio - 1).abs() > clip_eps).to(m.dtype) * m).sum() / count)}
    if ref_logp_NT is not None and kl_coef > 0:
        d = ref_logp_NT - logp_NT
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
        stats["kl"] = float((kl.detach() * m).sum() / count)
    return (per_token * m).sum() / count, stats


def completion_logprobs(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                        pad_id: int, temperature: float,
                        return_routing: bool = False) -> tuple[torch.Tensor, torch.Tensor, list | None, torch.Tensor]:
    """log pi(completion token | everything before it) at `temperature`, [N, C] with the token mask
    [N, C] (C = longest completion), the routing of the forward and which of its tokens are real.
    Rows are prompt + completion, right-padded: causal attention never looks right, so no mask."""
    device = next(model.parameters()).device
    N = len(prompts)
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    L = max(lengths)
    C = max(1, max(len(c) for c in completions))
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.as_tensor(list(p) + list(c), dtype=torch.long)
    ids = ids.to(device)
    first = min(len(p) for p in prompts) - 1  # the earliest position that predicts a completion token
    out = model(ids, return_routing=return_routing, logits_slice=slice(first, L - 1))
    logits = out.logits.float() / temperature  # position first + j predicts token first + j + 1
    targets = ids[:, first + 1:]
    logp_all = logits.gather(2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    index = torch.zeros(N, C, dtype=torch.long, device=device)
    tokens = torch.zeros(N, C, dtype=torch.bool, device=device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        index[i, :len(c)] = torch.arange(len(p) - 1 - first, len(p) - 1 - first + len(c))
        tokens[i, :len(c)] = True
    logp = logp_all.gather(1, index) * tokens
    valid = torch.zeros(N, L, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        valid[i, :n] = True
    return logp, tokens, out.routing, valid.reshape(-1)


# ---- data -------------------------------------------------------------------------------------------

class PromptData:
    """The RL prompts (JSONL of {messages, answer}) encoded with the chat format; Trainer's data."""

    domains: list[str] = []

    def __init__(self, path: str | Path, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer.path
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.turn_end_id
        self.pad_id = getattr(tokenizer, "pad_id", None) or self.eos_id
        self.items, self.ids = load_prompts(path, tokenizer)


def load_prompts(path: str | Path, tokenizer: Tokenizer) -> tuple[list[dict], list[list[int]]]:
    """Prompt items and their encoded chat prompts; each item gets `where` (file:line) for errors."""
    items, ids = [], []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        messages = messages_of(obj, where)
        if messages[-1]["role"] == "assistant":
            raise ConfigError(f"{where}: an RL prompt must end with a user turn (the model answers it)")
        try:
            text = chat_prompt(messages, tokenizer).text
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        items.append(obj | {"where": where})
        ids.append(tokenizer.encode(text))
    return items, ids


# ---- the trainer --------------------------------------------------------------------------------------

class RLTrainer(Trainer):
    """GRPO on `Trainer`'s checkpoints, resume, signals and metrics log."""

    cfg: RLConfig
    data: PromptData

    def __init__(self, cfg: RLConfig, data: PromptData, *, log=print):
        rewards = [resolve(s) for s in cfg.rewards]  # before the model is built: a typo fails fast
        if not rewards:
            raise ConfigError("rl needs at least one reward (--reward NAME[=WEIGHT])")
        super().__init__(cfg, data, log=log)
        self.rewards: list[Reward] = rewards
        self.stop_id = data.tokenizer.turn_end_id
        limit = self.model_cfg.max_position_embeddings
        for item, ids in zip(data.items, data.ids):
            if len(ids) + cfg.max_new_tokens > limit:
                raise ConfigError(f"{item['where']}: the prompt has {len(ids)} tokens; with max_new_tokens="
                                  f"{cfg.max_new_tokens} that exceeds the context of {limit}")
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.rates: dict[int, list[int]] = {}  # prompt index -> [passes, samples] (latest estimate)

    def extra_state(self) -> dict:
        return {"rates": {int(k): list(v) for k, v in self.rates.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.rates = {int(k): list(v) for k, v in state.get("rates", {}).items()}

    # ---- rollouts and rewards ------------------------------------------------------------------
    def rollout(self, indices: Sequence[int], samples: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """`samples` completions of each prompt (grouped: prompt i's are rows i*samples ..)."""
        prompts = [self.data.ids[i] for i in indices for _ in range(samples)]
        self.model.eval()
        result = generate(self.model, prompts, max_new_tokens=self.cfg.max_new_tokens,
                          sampling=Sampling(temperature=self.cfg.temperature, seed=seed), stop_ids=[self.stop_id])
        self.model.train()
        return prompts, result.tokens

    def score(self, indices: Sequence[int], samples: int,
              completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total reward, pass) [P, samples]. A reward function that raises stops the run with its name."""
        P = len(indices)
        total = torch.zeros(P, samples, dtype=torch.float64)
        passed = torch.zeros(P, samples, dtype=torch.float64)
        check = REWARDS[self.cfg.pass_reward]
        for k, ids in enumerate(completions):
            p, g = divmod(k, samples)
            item = self.data.items[indices[p]]
            body = [t for t in ids if t != self.stop_id]
            text = self.data.tokenizer.decode(body)
            for r in self.rewards:
                total[p, g] += r.weight * self._call(r.name, r.fn, text, ids, item, g)
            passed[p, g] = self._call(self.cfg.pass_reward, check, text, ids, item, g) > 0
        return total, passed

    def _call(self, name, fn, text, ids, item, sample) -> float:
        try:
            value = float(fn(text, ids, item))
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its place
            raise TrainingError(f"reward {name!r} raised {type(e).__name__}: {e} on the prompt at {item['where']}, "
                                f"sample {sample}, at step {self.step}; stopping without saving this step") from None
        if not np.isfinite(value):
            raise TrainingError(f"reward {name!r} returned {value} on the prompt at {item['where']}, sample "
                                f"{sample}, at step {self.step}: rewards must be finite")
        return value

    # ---- curriculum --------------------------------------------------------------------------------
    def choose_prompts(self) -> tuple[list[int], dict[str, float]]:
        cfg = self.cfg
        n = len(self.data.items)
        rng = np.random.default_rng([cfg.seed, self.step, 0])
        P = min(cfg.prompts_per_step, n)
        if not cfg.curriculum:
            return sorted(rng.choice(n, size=P, replace=False).tolist()), {}
        stats: dict[str, float] = {}
        if self.step % cfg.curriculum_every == 0 or not self.rates:
            t0 = time.perf_counter()
            pool = sorted(rng.choice(n, size=min(cfg.curriculum_pool, n), replace=False).tolist())
            _, comps = self.rollout(pool, cfg.curriculum_samples, seed=cfg.seed * 1_000_003 + self.step * 2 + 1)
            _, passed = self.score(pool, cfg.curriculum_samples, comps)
            for i, row in zip(pool, passed):
                self.rates[i] = [int(row.sum()), cfg.curriculum_samples]
            stats["curriculum_estimate_s"] = time.perf_counter() - t0
            stats["curriculum_pool_pass"] = float(passed.mean())
        mixed = sorted(i for i, (s, t) in self.rates.items() if 0 < s < t)
        unknown = [i for i in range(n) if i not in self.rates]
        chosen = rng.permutation(mixed).tolist()[:P]
        if len(chosen) < P and unknown:
            extra = rng.choice(len(unknown), size=min(P - len(chosen), len(unknown)), replace=False)
            chosen += [unknown[j] for j in extra]
        if len(chosen) < P:  # everything known is solved always or never: take some anyway
            rest = [i for i in range(n) if i not in set(chosen)]
            chosen += rng.permutation(rest).tolist()[:P - len(chosen)]
        stats["curriculum_mixed"] = float(len(mixed))
        return sorted(chosen), stats

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        indices, cur_stats = self.choose_prompts()
        G = cfg.group_size
        prompts, completions = self.rollout(indices, G, seed=cfg.seed * 1_000_003 + self.step * 2)
        rewards, passed = self.score(indices, G, completions)
        if cfg.curriculum:
            for i, row in zip(indices, passed):
                self.rates[i] = [int(row.sum()), G]
        adv_PG, informative_P = group_advantages(rewards.float())
        keep_P = informative_P if cfg.zero_adv_mask else torch.ones_like(informative_P)
        t_gen = time.perf_counter() - t0
        row: dict[str, Any] = {"step": self.step + 1, "reward": float(rewards.mean()),
                               "pass_rate": float(passed.mean()),
                               # the share of groups with equal rewards (masked when the mask is on)
                               "masked_fraction": float(1 - informative_P.float().mean()),
                               "completion_tokens": float(np.mean([len(c) for c in completions])),
                               "rollout_s": t_gen, **cur_stats}
        lr = phase_lr(self.step, cfg)
        row["lr"] = lr
        keep_N = keep_P.repeat_interleave(G).to(self.device)
        adv_N = adv_PG.reshape(-1).to(self.device)
        row["tokens"] = sum(len(p) + len(c) for p, c in zip(prompts, completions))
        if not bool(keep_N.any()):
            self.log(f"step {self.step + 1}: every group's rewards are equal (zero-advantage mask): no update")
            row["all_masked"] = True
            row["loss"] = 0.0
            self.step += 1
            return row
        pad = self.data.pad_id
        with torch.no_grad():
            old, tokens, _, _ = completion_logprobs(self.model, prompts, completions, pad_id=pad,
                                                    temperature=cfg.temperature)
            ref = None
            if self.reference is not None:
                ref = completion_logprobs(self.reference, prompts, completions, pad_id=pad,
                                          temperature=cfg.temperature)[0]
        tokens = tokens & keep_N.unsqueeze(1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for update in range(cfg.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            logp, _, routing, valid_T = completion_logprobs(self.model, prompts, completions, pad_id=pad,
                                                            temperature=cfg.temperature,
                                                            return_routing=self.model_cfg.is_moe)
            loss, stats = grpo_loss(logp, old, adv_N, tokens, clip_eps=cfg.clip_eps, ref_logp_NT=ref,
                                    kl_coef=cfg.kl_coef)
            if self.model_cfg.is_moe:
                extra, balance = routing_losses(routing, self.model_cfg, cfg, valid_T=valid_T)
                loss = loss + extra
                if update == 0:
                    row.update(balance)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite RL loss at step {self.step}; stopping without saving")
            loss.backward()
            norm, _ = self.procs.finish_gradients(self.model, {}, cfg.grad_clip if cfg.grad_clip else 1e30)
            if not torch.isfinite(norm):
                raise TrainingError(f"non-finite gradient norm at step {self.step}; stopping without saving")
            self.optimizer.step()
            if update == 0:
                row.update(loss=float(loss.detach()), grad_norm=float(norm), **stats)
            else:
                row["clip_fraction"] = stats["clip_fraction"]
        self.step += 1
        return row


# ---- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def accuracy(model, tokenizer: Tokenizer, items: Sequence[dict], prompt_ids: Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, batch: int = 100) -> dict[str, float]:
    """Greedy accuracy of `model` on the problems (exact answer check) and the share well formed."""
    stop = tokenizer.turn_end_id
    right = formed = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch):
        chunk = list(prompt_ids[start:start + batch])
        out = generate(model, chunk, max_new_tokens=max_new_tokens, sampling=Sampling(), stop_ids=[stop])
        for item, ids in zip(items[start:start + batch], out.tokens):
            text = tokenizer.decode([t for t in ids if t != stop])
            right += REWARDS["correct"](text, ids, item) > 0
            formed += REWARDS["format"](text, ids, item) > 0
    model.train(was_training)
    n = max(1, len(items))
    return {"accuracy": right / n, "well_formed": formed / n, "problems": len(items)}


def tokenizer_for(init: str, tokenizer: str | None) -> Tokenizer:
    """The tokenizer given, else the one saved beside the checkpoint."""
    return load_tokenizer(tokenizer or init)
