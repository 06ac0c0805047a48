"""Voted experts (the release's Ascend 300I Duo inference code): quality and speed.

    .venv/bin/python benchmarks/voted.py --threads 1 --json voted.json

Quality, on the trained tiny model (16 experts in 4 groups, one chosen per group), validation
cross-entropy with voting applied at inference, two ways:
- prefill: one forward per batch of 16 windows x 128 tokens, so the vote is over 2,048 tokens;
- decode: the same windows fed token by token through the KV cache, 16 sequences per step, so
  every step votes over 16 tokens (how a server decoding 16 requests would run it).
Speed: forward time of one MoGE layer (64 experts in 8 groups, K = 8, D = 512, F = 256, one
shared expert of 1024: the moge-small preset's layer), random weights, with the number of
distinct experts each forward reads; and decode tokens/s of the tiny model at batch 16.
Times are medians of --reps interleaved repetitions.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moge.checkpoint import load_pretrained
from moge.config import PRESETS
from moge.inference.generate import Sampling, generate
from moge.nn.moe import MoGEBlock
from moge.nn.model import KVCache
from moge.nn.routing import set_num_voted_experts
from moge.train.trainer import TrainData


def _windows(data: TrainData, per_domain: int) -> list[torch.Tensor]:
    out = []
    for domain in data.domains:
        out += list(data.val_batches(domain, per_domain, 16))
    return out


@torch.no_grad()
def quality(model, batches: list[torch.Tensor], settings: list[int | None], decode: bool) -> dict:
    res = {}
    for v in settings:
        set_num_voted_experts(model, v)
        total, tokens, distinct, steps = 0.0, 0, 0.0, 0
        for batch in batches:
            x, y = batch[:, :-1], batch[:, 1:]
            if not decode:
                out = model(x, return_routing=True)
                logits = out.logits
                distinct += sum(torch.unique(r.experts_TK).numel() for r in out.routing) / len(out.routing)
                steps += 1
            else:
                cache = KVCache.allocate(model.config, x.shape[0], x.shape[1], torch.float32)
                cols = []
                for t in range(x.shape[1]):
                    out = model(x[:, t:t + 1], cache=cache, return_routing=True)
                    cols.append(out.logits)
                    distinct += sum(torch.unique(r.experts_TK).numel() for r in out.routing) / len(out.routing)
                    steps += 1
                logits = torch.cat(cols, 1)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            tokens += y.numel()
        res[str(v)] = {"ce": total / tokens, "ppl": math.exp(total / tokens), "tokens": tokens,
                       "distinct_experts_per_layer_per_forward": distinct / steps}
    set_num_voted_experts(model, None)
    return res


@torch.inference_mode()
def layer_speed(settings: list[int | None], token_counts: list[int], reps: int) -> list[dict]:
    base = PRESETS["moge-small"].moe()
    torch.manual_seed(0)
    block = MoGEBlock(base).eval()
    rows = []
    for T in token_counts:
        x = torch.randn(T, base.hidden_size)
        times = {str(v): [] for v in settings}
        distinct = {}
        for _ in range(reps):
            for v in settings:
                set_num_voted_experts(block, v)
                block(x)  # warm
                t0 = time.perf_counter()
                n = max(1, 256 // T)
                for _ in range(n):
                    _, r = block(x, return_routing=True)
                times[str(v)].append((time.perf_counter() - t0) / n)
                distinct[str(v)] = int(torch.unique(r.experts_TK).numel())
        rows.append({"tokens": T, "ms": {k: 1e3 * statistics.median(t) for k, t in times.items()},
                     "distinct_experts": distinct})
    set_num_voted_experts(block, None)
    return rows


def decode_speed(model, prompts, settings, new_tokens: int, reps: int) -> dict:
    times = {str(v): [] for v in settings}
    for _ in range(reps):
        for v in settings:
            set_num_voted_experts(model, v)
            r = generate(model, prompts, max_new_tokens=new_tokens, sampling=Sampling(), stop_ids=[])
            times[str(v)].append(r.decode_tokens_per_s)
    set_num_voted_experts(model, None)
    return {k: statistics.median(t) for k, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/compare/runs/moge/seed-0/checkpoints/step-000300")
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-windows", type=int, default=32, help="validation windows per domain")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip", action="append", default=[], choices=["quality", "layer", "decode"])
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                             "torch": torch.__version__}}
    model = load_pretrained(args.model, dtype=torch.float32).eval()
    per = model.config.num_experts // model.config.num_groups
    settings = [None] + list(range(per - 1, 0, -1))
    data = TrainData(args.data, seq_len=128)
    batches = _windows(data, args.val_windows)
    print(f"tiny model, {per} experts per group, K' = {model.config.top_k // model.config.num_groups}; "
          f"'None' = no voting")
    for mode in () if "quality" in args.skip else ("prefill", "decode"):
        q = quality(model, batches, settings, decode=mode == "decode")
        res[f"quality_{mode}"] = q
        ref = q["None"]["ce"]
        vote_over = "2048 tokens" if mode == "prefill" else "16 tokens"
        print(f"\nvalidation, {mode} (vote over {vote_over}, {q['None']['tokens']} tokens):")
        print("| voted per group | CE | ppl | ppl change | distinct experts per layer |\n|---|---|---|---|---|")
        for k, v in q.items():
            print(f"| {k} | {v['ce']:.4f} | {v['ppl']:.2f} | {100 * (math.exp(v['ce'] - ref) - 1):+.2f}% | "
                  f"{v['distinct_experts_per_layer_per_forward']:.2f} |")

    block_settings = [None, 6, 4, 2, 1]
    rows = [] if "layer" in args.skip else layer_speed(block_settings, [16, 64, 256], args.reps)
    res["layer_speed"] = rows
    print(f"\nMoGE layer forward (64 experts in 8 groups, K=8, D=512, F=256, shared 1024; ms, {args.threads} "
          f"thread(s)); distinct experts read in brackets:")
    print("| tokens | " + " | ".join(f"voted {v}" for v in block_settings) + " |")
    print("|---" * (len(block_settings) + 1) + "|")
    for r in rows:
        cells = [f"{r['ms'][str(v)]:.2f} ({r['distinct_experts'][str(v)]})" for v in block_settings]
        print(f"| {r['tokens']} | " + " | ".join(cells) + " |")

    if "decode" in args.skip:
        sp = {}
    else:
        sp = decode_speed(model, [row[:32].tolist() for row in batches[0]], settings, 32, args.reps)
    res["decode_tokens_per_s_batch16"] = sp
    if sp:
        print("\ntiny model decode tokens/s at batch 16: " + ", ".join(f"voted {k}: {v:.1f}" for k, v in sp.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
