"""MTP speculative decoding: acceptance rate and decode speed against plain decoding.

Needs a checkpoint trained with an MTP module, e.g.

    .venv/bin/moge train --model moge-tiny --mtp --mtp-weight 0.3 --steps 300 --eval-every 100 \\
        --save-every 100 --threads 1 --out runs/mtp/moge-mtp0.3
    .venv/bin/python benchmarks/speculative.py --ckpt runs/mtp/moge-mtp0.3/checkpoints/step-000300 \\
        --baseline runs/compare/runs/moge/seed-0 --threads 1

Prompts are the first `--prompt-len` tokens of validation windows of every domain of `--data`.
For each prompt (batch 1, stop tokens off so every run makes `--new-tokens` tokens) it runs plain
greedy `generate` and `speculative_generate` with each `--num-draft`, interleaved, `--reps` times,
and reports the median wall time of whole calls (prefill included) and of the decode part, the
draft acceptance rate (greedy and, with `--temperature`, sampled), and checks that the greedy
outputs are identical. With `--baseline RUN_DIR` it also prints the main model's validation loss
of a run trained without MTP next to this one's (from their metrics.jsonl).

`--random-preset moge-small` adds the cost side for a larger model with random weights (whose
drafts are never right): milliseconds of one plain decode step, of one verify pass over k + 1
tokens and of one MTP step, and the acceptance rate at which speculative decoding would break even.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moge.checkpoint import load_pretrained
from moge.config import PRESETS
from moge.inference.generate import Sampling, generate
from moge.nn.model import KVCache, PanguProMoEForCausalLM
from moge.inference.speculative import speculative_generate


def logged_val(run_dir: Path, step: int | None = None) -> dict[str, float] | None:
    """The validation losses metrics.jsonl logged at `step` (default: the last ones)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    vals = [r for r in rows if "val" in r and (step is None or r["step"] == step)]
    return vals[-1]["val"] if vals else None


def split_val(val: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    main = {k: v for k, v in val.items() if not k.startswith("mtp/")}
    mtp = {k.removeprefix("mtp/"): v for k, v in val.items() if k.startswith("mtp/")}
    return main, mtp


def load_prompts(data: str, per_domain: int, prompt_len: int) -> list[list[int]]:
    from moge.train.trainer import TrainData

    td = TrainData(data, seq_len=prompt_len)
    prompts = []
    for domain in td.domains:
        for batch in td.val_batches(domain, per_domain, per_domain):
            prompts += [row[:prompt_len].tolist() for row in batch]
    return prompts


def time_call(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def bench_trained(model, prompts, new_tokens: int, drafts: list[int], reps: int, temperature: float) -> dict:
    plain_total, plain_decode = [], []
    spec_total = {k: [] for k in drafts}
    spec_decode = {k: [] for k in drafts}
    stats = {k: {"drafted": 0, "accepted": 0, "steps": 0, "tokens": 0} for k in drafts}
    identical = True
    # warm-up
    generate(model, prompts[:1], max_new_tokens=4, stop_ids=[])
    speculative_generate(model, prompts[:1], max_new_tokens=4, stop_ids=[])
    for rep in range(reps):
        for prompt in prompts:
            t, res = time_call(lambda p=prompt: generate(model, [p], max_new_tokens=new_tokens, stop_ids=[]))
            plain_total.append(t)
            plain_decode.append(res.decode_s)
            for k in drafts:
                t, spec = time_call(lambda p=prompt, k=k: speculative_generate(
                    model, [p], max_new_tokens=new_tokens, stop_ids=[], num_draft=k))
                spec_total[k].append(t)
                spec_decode[k].append(spec.decode_s)
                identical &= spec.tokens == res.tokens
                if rep == 0:
                    s = stats[k]
                    s["drafted"] += spec.drafted
                    s["accepted"] += spec.accepted
                    s["steps"] += spec.decode_steps
                    s["tokens"] += spec.new_tokens - 1
    n = len(prompts)
    out = {"prompts": n, "greedy_identical": identical,
           "plain": {"total_s": statistics.median(plain_total), "decode_s": statistics.median(plain_decode)}}
    for k in drafts:
        s = stats[k]
        out[f"k={k}"] = {"total_s": statistics.median(spec_total[k]), "decode_s": statistics.median(spec_decode[k]),
                         "acceptance_rate": s["accepted"] / max(1, s["drafted"]),
                         "tokens_per_step": s["tokens"] / max(1, s["steps"])}
    for key in ["plain", *[f"k={k}" for k in drafts]]:
        r = out[key]
        r["tok_s"] = new_tokens / r["total_s"]
        r["decode_tok_s"] = (new_tokens - 1) / r["decode_s"]
    if temperature > 0:
        for k in drafts:
            drafted = accepted = 0
            for i, prompt in enumerate(prompts):
                spec = speculative_generate(model, [prompt], max_new_tokens=new_tokens, stop_ids=[], num_draft=k,
                                            sampling=Sampling(temperature=temperature, seed=i))
                drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
            out[f"k={k}"][f"acceptance_rate_t{temperature:g}"] = accepted / max(1, drafted)
    return out


@torch.inference_mode()
def step_costs(model: PanguProMoEForCausalLM, drafts: list[int], prompt_len: int, reps: int) -> dict:
    """ms of one plain decode step, one verify pass over k + 1 tokens and one MTP step (batch 1,
    after a prompt of `prompt_len` tokens), measured round-robin so load changes hit all alike."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=gen)
    width = max(drafts) + 1
    cache = KVCache.allocate(cfg, 1, prompt_len + width, torch.float32)
    out = model(ids, cache=cache, logits_slice=slice(-1, None))
    mcache = KVCache.allocate(cfg.replace(num_layers=1), 1, prompt_len + width, torch.float32)
    model.mtp_forward(out.pre_norm_hidden, ids, cache=mcache, logits_slice=slice(-1, None))
    step = torch.randint(3, cfg.vocab_size, (1, width), generator=gen)

    def trunk(tokens: int) -> None:
        cache.truncate(prompt_len)
        model(step[:, :tokens], cache=cache)

    def mtp() -> None:
        mcache.truncate(prompt_len)
        model.mtp_forward(out.pre_norm_hidden[:, -1:], step[:, :1], cache=mcache, logits_slice=slice(-1, None))

    jobs = {"decode": lambda: trunk(1), "mtp": mtp, **{f"verify{k}": (lambda k=k: trunk(k + 1)) for k in drafts}}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for rep in range(reps + 1):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if rep:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    res = {"decode_ms": ms["decode"], "mtp_ms": ms["mtp"]}
    for k in drafts:
        # one iteration: the verify pass and k MTP steps (1 update + k - 1 chained; the update runs
        # over the accepted positions, costed here as one step)
        iteration = ms[f"verify{k}"] + k * ms["mtp"]
        res[f"k={k}"] = {"verify_ms": ms[f"verify{k}"], "iteration_ms": iteration,
                         # tokens per iteration needed to match plain decoding
                         "break_even_tokens_per_step": iteration / ms["decode"]}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint directory of a model with an MTP module")
    p.add_argument("--baseline", help="run directory of the same model trained without MTP (for val loss)")
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--prompts-per-domain", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--num-draft", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0, help="also measure sampled acceptance (0 = skip)")
    p.add_argument("--random-preset", default=None, help="also cost a preset with random weights, e.g. moge-small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results: dict = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
                     "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    lines: list[str] = []
    if args.ckpt:
        ckpt = Path(args.ckpt)
        model = load_pretrained(ckpt).eval()
        run_dir = ckpt.parent.parent
        step = int(ckpt.name.removeprefix("step-")) if ckpt.name.startswith("step-") else None
        val = logged_val(run_dir, step)
        if val:
            main_val, mtp_val = split_val(val)
            results["val"] = {"main": main_val, "mtp": mtp_val}
            header = "  ".join(f"{d:>12s}" for d in main_val)
            lines.append(f"validation CE, step {step} (nats/token)".ljust(32) + f" {header}        mean")
            rows = [("main model, with MTP loss", main_val), ("MTP module (token t+2)", mtp_val)]
            if args.baseline:
                base = logged_val(Path(args.baseline), step)  # the same step of the baseline run
                if base:
                    results["val"]["baseline_main"] = split_val(base)[0]
                    rows.insert(0, ("main model, no MTP loss", split_val(base)[0]))
            for name, v in rows:
                lines.append(f"{name:32s} " + "  ".join(f"{v[d]:12.4f}" for d in main_val)
                             + f"  {statistics.mean(v.values()):10.4f}")
        prompts = load_prompts(args.data, args.prompts_per_domain, args.prompt_len)
        res = bench_trained(model, prompts, args.new_tokens, args.num_draft, args.reps, args.temperature)
        res["costs"] = step_costs(model, args.num_draft, args.prompt_len, 41)
        results["trained"] = res
        lines.append("")
        lines.append(f"{ckpt}: batch 1, {res['prompts']} prompts of {args.prompt_len} tokens, {args.new_tokens} new "
                     f"tokens, median of {args.reps} reps, {args.threads} thread(s); greedy outputs identical: "
                     f"{res['greedy_identical']}")
        lines.append(f"{'':10s} {'accept':>8s} {'tok/step':>9s} {'tok/s':>8s} {'decode tok/s':>13s} {'speed-up':>9s}")
        base_tok_s = res["plain"]["tok_s"]
        lines.append(f"{'plain':10s} {'':8s} {1.0:9.2f} {base_tok_s:8.1f} {res['plain']['decode_tok_s']:13.1f} "
                     f"{1.0:8.2f}x")
        for k in args.num_draft:
            r = res[f"k={k}"]
            extra = f"  (sampled T={args.temperature:g}: {r[f'acceptance_rate_t{args.temperature:g}']:.1%})" \
                if args.temperature > 0 else ""
            lines.append(f"{'spec k=' + str(k):10s} {r['acceptance_rate']:8.1%} {r['tokens_per_step']:9.2f} "
                         f"{r['tok_s']:8.1f} {r['decode_tok_s']:13.1f} {r['tok_s'] / base_tok_s:8.2f}x{extra}")
        c = res["costs"]
        lines.append(f"step costs: decode {c['decode_ms']:.2f} ms, MTP step {c['mtp_ms']:.2f} ms, "
                     + ", ".join(f"verify k={k} {c[f'k={k}']['verify_ms']:.2f} ms (break-even "
                                 f"{c[f'k={k}']['break_even_tokens_per_step']:.2f} tok/step)" for k in args.num_draft))
    if args.random_preset:
        cfg = PRESETS[args.random_preset].replace(num_mtp_modules=1)
        torch.manual_seed(0)
        model = PanguProMoEForCausalLM(cfg).init_weights(seed=0).eval()
        c = step_costs(model, args.num_draft, args.prompt_len, 15)
        results["random"] = {"preset": args.random_preset, **c}
        lines.append("")
        lines.append(f"{args.random_preset} + MTP, random weights, batch 1: decode step {c['decode_ms']:.1f} ms, "
                     f"MTP step {c['mtp_ms']:.1f} ms")
        for k in args.num_draft:
            r = c[f"k={k}"]
            lines.append(f"  k={k}: verify {r['verify_ms']:.1f} ms, iteration {r['iteration_ms']:.1f} ms -> needs "
                         f"{r['break_even_tokens_per_step']:.2f} tokens per step to break even")
    print(json.dumps(results, indent=2) if args.json else "\n".join(lines))


if __name__ == "__main__":
    main()
