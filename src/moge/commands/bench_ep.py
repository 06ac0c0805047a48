"""`moge bench-ep`: MoGE vs top-K on real expert-parallel processes (see moge.parallel.bench)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moge.commands import list_argument
from moge.errors import ConfigError


_ints = list_argument(int, lambda v: v > 0, "every value must be a positive integer")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-ep", help="MoGE vs top-K on real expert-parallel CPU processes: per-rank load and time",
        description="Starts one gloo process group per expert-parallel size (CPU processes, no torchrun needed), "
                    "routes each rank's tokens with MoGE and with top-K (same experts, same K, same logits), "
                    "dispatches them with all_to_all and runs the local experts. Reports per rank: rows "
                    "received, expert compute time as wall time and as the thread's own CPU time (with more "
                    "processes than cores the wall time includes waiting for a core; CPU time does not) and "
                    "the FLOP/s it implies, and step time; max/mean over ranks, median of --repeats steps. "
                    "Routing from i.i.d. random logits and from a trained checkpoint's router on real text "
                    "(--checkpoint), or without one from a skewed synthetic distribution (labelled as such). "
                    "Writes bench_ep.json, bench_ep.md and bench_ep.png to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep-sizes", type=_ints, default=(2, 4, 8), help="expert-parallel sizes (default: 2,4,8)")
    p.add_argument("--tokens", type=_ints, default=(16, 64, 256, 1024, 4096),
                   help="tokens per rank (default: 16,64,256,1024,4096)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the benchmark layer (default: 256)")
    p.add_argument("--ffn", type=int, default=128, help="expert intermediate size (default: 128)")
    p.add_argument("--experts", type=int, default=64, help="routed experts (default: 64, as Pangu Pro MoE)")
    p.add_argument("--groups", type=int, default=8, help="expert groups for MoGE (default: 8)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case after one warm-up (default: 3)")
    p.add_argument("--checkpoint", help="trained checkpoint whose router supplies real routing logits "
                                        "(the layer shape must match: --experts/--groups/--top-k)")
    p.add_argument("--data", default="data/corpus", help="prepared corpus for --checkpoint (default: data/corpus)")
    p.add_argument("--out", default="runs/bench-ep", help="output directory (default: runs/bench-ep)")
    p.add_argument("--dist-timeout", type=float, default=600.0, help="seconds before a stuck rank is an error")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moge.parallel.bench import BenchConfig, format_comparison, format_table, run_bench, write_outputs

    for name in ("hidden", "ffn", "experts", "groups", "top_k", "repeats"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: "
                              "must be a positive integer")
    cfg = BenchConfig(hidden_size=args.hidden, expert_intermediate_size=args.ffn, num_experts=args.experts,
                      num_groups=args.groups, top_k=args.top_k, ep_sizes=args.ep_sizes, tokens=args.tokens,
                      repeats=args.repeats, timeout_s=args.dist_timeout)
    cfg.moe("grouped")  # validates the layer shape before any process starts
    result = run_bench(cfg, checkpoint=args.checkpoint, data=args.data,
                       progress=lambda msg: print(msg, file=sys.stderr))
    paths = write_outputs(result, Path(args.out))
    if args.json:
        keys = ("summary", "comparison", "sources", "skipped")
        print(json.dumps({**{k: result[k] for k in keys}, "files": paths}, indent=2))
    else:
        print(format_table(result["summary"]))
        print()
        print(format_comparison(result["comparison"]))
        for s in result["skipped"]:
            print(f"skipped EP{s['ep']}: {s['reason']}")
        print(f"wrote {paths['json']}, {paths['table']}, {paths['png']}")
    return 0
