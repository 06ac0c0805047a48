"""Our MoE layer against Hugging Face transformers' Qwen2-MoE sparse block and a bare GEMM floor.

All contenders run in this one process, interleaved, on identical sizes (N experts, top-K, expert
width, one shared expert). Prints medians and ratios (>1 means we are faster); `--json` for
scripts, `--markdown` for docs/benchmarks.md.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/moe_layer.py --threads 1 2

Contenders
  moge        our MoGEBlock, router="grouped" (MoGE), backend auto
  moge-loop   the same with the loop kernel forced; moge-gmm with the grouped_mm kernel forced
  moge-topk   our MoGEBlock with softmax-then-top-K routing, exactly Qwen2-MoE's (norm_topk_prob off):
              the same kernel, the peer's routing
  hf-<impl>   transformers Qwen2MoeSparseMoeBlock with experts implementation eager / grouped_mm /
              batched_mm (batched_mm copies one weight matrix per token slot: skipped when that
              copy would exceed --batched-mm-limit-gb)
  floor       only the expert matmuls (routed experts with the same per-expert token counts, plus
              the shared expert) on pre-sorted contiguous inputs: no routing, no permutation
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from moge.config import MoEConfig
from moge.nn.moe import MoGEBlock


def make_hf_block(d: int, n: int, k: int, f: int, shared: int, impl: str):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=d, num_experts=n, num_experts_per_tok=k, moe_intermediate_size=f,
                         shared_expert_intermediate_size=shared, norm_topk_prob=False)
    cfg._experts_implementation = impl
    block = Qwen2MoeSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block


def copy_weights(hf, ours: MoGEBlock) -> None:
    """Same numbers in both, so the peers do identical work (same routing for top-K)."""
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_expert, name).weight.copy_(getattr(hf.shared_expert, name).weight)


class Floor(torch.nn.Module):
    """The matmuls alone, with the per-expert token counts of a real routing."""

    def __init__(self, block: MoGEBlock, counts: list[int], x_TD: torch.Tensor):
        super().__init__()
        self.block = block
        self.counts = counts
        self.x_RD = x_TD.repeat(block.cfg.top_k, 1)[: sum(counts)].contiguous()

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gu = self.block.experts.gate_up_proj.unbind(0)
        dn = self.block.experts.down_proj.unbind(0)
        outs, start = [], 0
        for e, c in enumerate(self.counts):
            if c:
                h = F.linear(self.x_RD[start:start + c], gu[e])
                g, u = h.chunk(2, -1)
                outs.append(F.linear(F.silu(g) * u, dn[e]))
                start += c
        return torch.cat(outs).sum() + self.block.shared_expert(x_TD).sum()


def time_fn(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench_case(t: int, d: int, n: int, m: int, k: int, f: int, shared: int, reps: int, batched_limit_gb: float,
               seed: int = 0) -> dict:
    torch.manual_seed(seed)
    impls = ["eager", "grouped_mm"]
    if t * k * 3 * f * d * 4 / 1e9 <= batched_limit_gb:
        impls.append("batched_mm")
    hf = {impl: make_hf_block(d, n, k, f, shared, impl) for impl in impls}
    for impl in impls[1:]:
        hf[impl].load_state_dict(hf["eager"].state_dict())
    ours = {}
    variants = (("moge", "grouped", "auto"), ("moge-loop", "grouped", "loop"),
                ("moge-gmm", "grouped", "grouped_mm"), ("moge-topk", "softmax_topk", "auto"))
    for name, router, backend in variants:
        block = MoGEBlock(MoEConfig(hidden_size=d, num_experts=n, num_groups=m, top_k=k, expert_intermediate_size=f,
                                    shared_expert_sizes=(shared,), router=router, backend=backend))
        copy_weights(hf["eager"], block)
        ours[name] = block
    x = torch.randn(1, t, d)
    with torch.no_grad():
        routing = ours["moge"].router(x.view(-1, d))
    counts = torch.bincount(routing.experts_TK.reshape(-1), minlength=n).tolist()
    floor = Floor(ours["moge"], counts, x.view(-1, d))

    contenders = {**ours, "floor": floor,
                  **{f"hf-{impl}": blk for impl, blk in hf.items()}}
    grad = torch.randn(1, t, d)

    def fwd(module):
        def run():
            with torch.no_grad():
                module(x) if module is not floor else module(x.view(-1, d))
        return run

    def fwd_bwd(module):
        def run():
            module.zero_grad(set_to_none=True)
            if module is floor:
                module(x.view(-1, d)).backward()
            else:
                module(x).backward(grad)
        return run

    result = {"tokens": t, "forward_ms": {}, "fwd_bwd_ms": {}}
    # interleave contenders rep by rep so machine noise hits all of them alike
    for mode, maker in (("forward_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        runs = {name: maker(mod) for name, mod in contenders.items()}
        for run in runs.values():
            run()
        samples = {name: [] for name in runs}
        for _ in range(reps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
        result[mode] = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    # check the peers compute the same thing (top-K routing, same weights; HF gates its shared expert)
    with torch.no_grad():
        a = ours["moge-topk"].experts(x.view(-1, d), *reversed(_wk(ours["moge-topk"], x.view(-1, d))))
        _, w, ids = hf["eager"].gate(x.view(-1, d))
        b = hf["eager"].experts(x.view(-1, d), ids, w)
    result["max_abs_diff_vs_hf_experts"] = float((a - b).abs().max())
    return result


def _wk(block, x):
    r = block.router(x)
    return r.weights_TK, r.experts_TK


def ratios(res: dict) -> dict:
    out = {}
    for mode in ("forward_ms", "fwd_bwd_ms"):
        ms = res[mode]
        hf = {k: v for k, v in ms.items() if k.startswith("hf-")}
        fastest = min(hf, key=hf.get)
        out[mode] = {"hf_fastest": fastest, "vs_hf_fastest": hf[fastest] / ms["moge"],
                     "vs_hf_eager": ms["hf-eager"] / ms["moge"], "floor_over_moge": ms["floor"] / ms["moge"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 4096])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--shared", type=int, default=1024)
    p.add_argument("--large", action="store_true", help="add the larger case D=1024, F=512, shared 2048, T=2048")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batched-mm-limit-gb", type=float, default=2.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", help="also write the JSON results to this file")
    args = p.parse_args()

    cases = [(t, args.hidden, args.ffn, args.shared) for t in args.tokens]
    if args.large:
        cases.append((2048, 1024, 512, 2048))
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for t, d, f, shared in cases:
            res = bench_case(t, d, args.experts, args.groups, args.top_k, f, shared, args.reps,
                             args.batched_mm_limit_gb)
            res.update(threads=threads, hidden=d, ffn=f, shared=shared, ratios=ratios(res))
            rows.append(res)
            if not args.json:
                print_row(res)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpus": torch.get_num_threads()}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)


def print_row(res: dict) -> None:
    head = f"T={res['tokens']} D={res['hidden']} F={res['ffn']} threads={res['threads']}"
    print(head)
    for mode in ("forward_ms", "fwd_bwd_ms"):
        ms = res[mode]
        r = res["ratios"][mode]
        parts = "  ".join(f"{k}={v:.2f}" for k, v in ms.items())
        print(f"  {mode:10} {parts}")
        print(f"  {'':10} vs {r['hf_fastest']}: {r['vs_hf_fastest']:.2f}x  vs hf-eager: {r['vs_hf_eager']:.2f}x  "
              f"floor/moge: {r['floor_over_moge']:.2f}")
    print(f"  max |ours - hf| experts output: {res['max_abs_diff_vs_hf_experts']:.2e}", flush=True)


if __name__ == "__main__":
    main()
