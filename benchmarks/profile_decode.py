"""Where a batch-1 decode step's time goes: torch.profiler over greedy decode steps of moge-small.

Groups the aten ops' self CPU time into kinds (weight matmuls, the routed-expert kernel,
attention, routing, norms and elementwise, cache copies, the rest) and reports each per token,
next to the step's wall time: what the ops do not account for is Python, module calls and
dispatch. Prints a table (and JSON with --json). Compare the matmul time with the bandwidth floor
that benchmarks/generate.py reports.

    .venv/bin/python benchmarks/profile_decode.py --threads 1 --steps 32
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moge.config import PRESETS
from moge.nn.model import KVCache, PanguProMoEForCausalLM

KINDS = (
    ("expert kernel", ("grouped_mm", "_grouped_mm", "index_add", "weight_only")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::_weight_int")),
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax", "_softmax")),
    ("routing", ("topk", "sort", "scatter", "gather", "sigmoid", "bincount", "argsort", "cumsum")),
    ("norm/elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow", "aten::mean",
                          "aten::neg", "aten::cat", "aten::div", "aten::sub", "aten::exp", "aten::cos", "aten::sin")),
    ("copies/indexing", ("copy_", "index_select", "index", "slice", "select", "view", "reshape", "contiguous",
                         "clone", "empty", "zeros", "full", "to", "_to_copy", "expand", "narrow", "as_strided")),
)


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other ops"


@torch.inference_mode()
def profile_decode(preset: str, steps: int, prompt_len: int, threads: int, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = PRESETS[preset]
    model = PanguProMoEForCausalLM(cfg).eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len))
    cache = KVCache.allocate(cfg, 1, prompt_len + 3 * steps + 16, torch.float32, "cpu")
    out = model(prompt, cache=cache, logits_slice=slice(-1, None))
    tok = out.logits[:, -1].argmax(-1).view(1, 1)
    for _ in range(steps // 4 + 2):  # warm-up steps
        tok = model(tok, cache=cache).logits[:, -1].argmax(-1).view(1, 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, cache=cache).logits[:, -1].argmax(-1).view(1, 1)
    plain_s = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache=cache).logits[:, -1].argmax(-1).view(1, 1)
        profiled_s = (time.perf_counter() - t0) / steps
    by_kind: dict[str, float] = defaultdict(float)
    calls = 0
    top = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        self_us = ev.self_cpu_time_total / steps
        by_kind[kind_of(ev.key)] += self_us
        calls += ev.count
        top.append((ev.key, self_us, ev.count // steps))
    op_us = sum(by_kind.values())
    top.sort(key=lambda r: -r[1])
    return {"preset": preset, "threads": threads, "steps": steps, "prompt_len": prompt_len,
            "step_ms_unprofiled": plain_s * 1e3, "step_ms_profiled": profiled_s * 1e3,
            "aten_calls_per_step": calls // steps,
            "self_ms_by_kind": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "outside_aten_ms": profiled_s * 1e3 - op_us / 1e3,
            "top_ops": [{"op": k, "self_ms": us / 1e3, "calls_per_step": c} for k, us, c in top[:15]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moge-small")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = profile_decode(args.preset, args.steps, args.prompt_len, args.threads)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['preset']}, {r['threads']} thread(s), batch 1, after a {r['prompt_len']}-token prompt: "
          f"{r['step_ms_unprofiled']:.2f} ms per token unprofiled, {r['step_ms_profiled']:.2f} ms profiled, "
          f"{r['aten_calls_per_step']} aten calls per token")
    print(f"{'kind':<20} {'ms/token':>9} {'share':>7}")
    for kind, ms in r["self_ms_by_kind"].items():
        print(f"{kind:<20} {ms:9.3f} {ms / r['step_ms_profiled']:7.1%}")
    print(f"{'outside aten ops':<20} {r['outside_aten_ms']:9.3f} {r['outside_aten_ms'] / r['step_ms_profiled']:7.1%}"
          "  (Python, module calls, dispatch, profiler)")
    print("\ntop ops by self time:")
    for row in r["top_ops"]:
        print(f"  {row['op']:<40} {row['self_ms']:8.3f} ms  {row['calls_per_step']:4d} calls/token")


if __name__ == "__main__":
    main()
