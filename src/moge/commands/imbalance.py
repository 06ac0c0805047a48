"""`moge imbalance`: Monte Carlo of the Imbalance Score, top-K MoE against MoGE (paper Fig. 2b)."""

from __future__ import annotations

import argparse
import json

import torch

from moge.errors import ConfigError
from moge.metrics import ImbalanceStudy, simulate_imbalance

SWEEP_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "imbalance", help="Monte Carlo of the Imbalance Score: top-K MoE vs MoGE (paper Fig. 2b)",
        description="Draws random routing decisions and measures how unevenly experts load the devices. "
                    "Top-K: each token picks K distinct experts anywhere. MoGE: each token picks K/M "
                    "experts inside each of M groups, one group per device. IS = (max_i T_i - min_i T_i) "
                    "/ tokens, with T_i the token-expert assignments device i computes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experts", type=int, default=64, help="number of routed experts N")
    p.add_argument("--top-k", type=int, default=8, help="experts per token K")
    p.add_argument("--groups", type=int, default=8, help="groups = devices M (experts placed contiguously)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per batch |X|")
    p.add_argument("--trials", type=int, default=20000, help="Monte Carlo batches")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--zipf", type=float, default=0.0,
                   help="router skew: expert popularity proportional to 1/rank^s (0 = uniform)")
    p.add_argument("--bins", type=int, default=20, help="histogram bins")
    p.add_argument("--sweep", action="store_true",
                   help=f"also sweep batch sizes {SWEEP_TOKENS[0]}..{SWEEP_TOKENS[-1]} tokens "
                        "(mean IS and mean max/mean device load)")
    p.add_argument("--plot", metavar="FILE.png", help="draw both IS histograms (and the sweep) to a PNG")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def _weights(args: argparse.Namespace) -> torch.Tensor | None:
    if args.zipf < 0:
        raise ConfigError(f"--zipf={args.zipf} is invalid: must be >= 0")
    if args.zipf == 0:
        return None
    ranks = torch.randperm(args.experts, generator=torch.Generator().manual_seed(args.seed)) + 1
    return ranks.float().pow(-args.zipf)


def _validate(args: argparse.Namespace) -> None:
    for name in ("experts", "top_k", "groups", "tokens", "trials", "bins"):
        v = getattr(args, name)
        if v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={v} is invalid: must be a positive integer")
    if args.experts % args.groups:
        raise ConfigError(f"--groups={args.groups} is invalid: must divide --experts={args.experts}")
    if args.top_k % args.groups or args.top_k // args.groups > args.experts // args.groups:
        raise ConfigError(f"--top-k={args.top_k} is invalid: must be a multiple of --groups={args.groups} "
                         f"with top_k/groups <= experts/groups={args.experts // args.groups}")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    weights = _weights(args)
    common = dict(num_experts=args.experts, top_k=args.top_k, num_devices=args.groups, seed=args.seed,
                  expert_weights=weights)
    studies = {name: simulate_imbalance(args.trials, args.tokens, grouped=grouped, **common)
               for name, grouped in (("topk", False), ("moge", True))}
    hist_max = max(float(s.scores.max()) for s in studies.values()) or 1.0
    result = {
        "config": {k: getattr(args, k) for k in ("experts", "top_k", "groups", "tokens", "trials", "seed", "zipf")},
        **{name: s.summary(bins=args.bins, hist_max=hist_max) for name, s in studies.items()},
    }
    if args.sweep:
        result["sweep"] = _sweep(args, common)
    if args.plot:
        _plot(args.plot, studies, result.get("sweep"), result["config"])
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _sweep(args: argparse.Namespace, common: dict) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for tokens in tqdm(SWEEP_TOKENS, desc="sweep", unit="size", disable=args.json):
        # fewer trials for large batches: the spread of the mean shrinks with batch size anyway
        trials = max(100, min(args.trials, 40_000_000 // (tokens * args.experts)))
        row: dict = {"tokens": tokens, "trials": trials}
        for name, grouped in (("topk", False), ("moge", True)):
            s = simulate_imbalance(trials, tokens, grouped=grouped, **common)
            row[f"{name}_mean_is"] = float(s.scores.double().mean())
            row[f"{name}_p_is_positive"] = float((s.scores > 0).double().mean())
            row[f"{name}_mean_max_over_mean"] = float(s.max_over_mean.double().mean())
        rows.append(row)
    return rows


def _print_table(result: dict) -> None:
    c = result["config"]
    print(f"Imbalance Score over {c['trials']} random batches: N={c['experts']} experts, K={c['top_k']}, "
          f"M={c['groups']} devices, {c['tokens']} tokens/batch" + (f", zipf s={c['zipf']}" if c["zipf"] else ""))
    print(f"{'':8}{'P(IS>0)':>9}{'mean':>8}{'std':>8}{'min':>8}{'p50':>8}{'p95':>8}{'max':>8}{'max/mean':>10}")
    for name in ("topk", "moge"):
        s = result[name]
        print(f"{name:8}{s['p_is_positive']:9.4f}{s['mean']:8.4f}{s['std']:8.4f}{s['min']:8.4f}"
              f"{s['percentiles']['p50']:8.4f}{s['percentiles']['p95']:8.4f}{s['max']:8.4f}"
              f"{s['mean_max_over_mean']:10.4f}")
    if "sweep" in result:
        print("\nBatch-size sweep (mean over batches)")
        print(f"{'tokens':>7}{'trials':>8}{'topk IS':>10}{'moge IS':>10}{'topk max/mean':>15}{'moge max/mean':>15}")
        for r in result["sweep"]:
            print(f"{r['tokens']:7d}{r['trials']:8d}{r['topk_mean_is']:10.4f}{r['moge_mean_is']:10.4f}"
                  f"{r['topk_mean_max_over_mean']:15.4f}{r['moge_mean_max_over_mean']:15.4f}")
    if "plot" in result:
        print(f"\nplot written to {result['plot']}")


def _plot(path: str, studies: dict[str, ImbalanceStudy], sweep: list[dict] | None, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if sweep else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    top = max(float(s.scores.max()) for s in studies.values())
    step = 1.0 / cfg["tokens"]
    bins = torch.arange(-step / 2, top + step, step).tolist()
    for name, color in (("topk", "tab:red"), ("moge", "tab:blue")):
        s = studies[name].scores.numpy()
        label = f"{'Top-K MoE' if name == 'topk' else 'MoGE'}: P(IS>0)={(s > 0).mean():.3f}, mean={s.mean():.3f}"
        ax.hist(s, bins=bins, weights=[1.0 / len(s)] * len(s), alpha=0.7, color=color, label=label)
    ax.set_xlabel("Imbalance Score")
    ax.set_ylabel("fraction of batches")
    ax.set_title(f"N={cfg['experts']}, K={cfg['top_k']}, M={cfg['groups']} devices, {cfg['tokens']} tokens/batch")
    ax.legend()
    if sweep:
        ax = axes[0][1]
        xs = [r["tokens"] for r in sweep]
        ax.plot(xs, [r["topk_mean_max_over_mean"] for r in sweep], "o-", color="tab:red", label="Top-K MoE")
        ax.plot(xs, [r["moge_mean_max_over_mean"] for r in sweep], "o-", color="tab:blue", label="MoGE")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per batch")
        ax.set_ylabel("busiest device / mean device load")
        ax.set_title("Straggler factor vs batch size")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
