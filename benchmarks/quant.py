"""W8A8 and weight-only quantization of the trained tiny model: quality, expert agreement, memory
and speed.

    .venv/bin/python benchmarks/quant.py --threads 1 --json quant.json

1. Calibrates and quantizes a float checkpoint (expert-balanced calibration windows from the
   corpus' training split, expert-aware smoothing, router-aligned alpha per site; moge.quant).
2. Validation: perplexity of the float and the W8A8 model on the same held-out windows (per
   domain and overall), and per layer the share of each token's selected experts that the W8A8
   model selects too (the float and W8A8 model see the same tokens; routing is compared in the
   W8A8 model's own forward pass, so upstream errors count).
   The same on a copy of the model with a few outlier channels injected after every norm (the
   float function unchanged), with and without smoothing: what smoothing is for.
3. Weight memory: the quantized matrices in int8 + fp32 scales against the same matrices in fp32,
   and the whole model.
   The weight-only int8 / int4 models (moge.quant.weight_only: round-to-nearest, float
   activations) are evaluated alongside.
4. Decode tokens/s (greedy, fixed length), float vs W8A8 vs weight-only, interleaved, at batch 1 and 16.
5. A larger layer (hidden 1024 by default): one linear [M, D] x [D, D] in fp32, in W8A8 with both
   integer kernels of moge.quant.int8, and oneDNN's u8s8 int8 GEMM (the vendor kernel torch uses for
   its x86 quantized ops), with its error: on CPUs without VNNI its 16-bit intermediate sums
   saturate for full-range int8 weights, which is why moge does not use it.
Times are medians of --reps repetitions, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from moge.checkpoint import load_pretrained
from moge.inference.generate import Sampling, generate
from moge.quant import (balanced_calibration_set, int8_kernel, int8_linear, int8_mm, quantize_model,
                        quantize_per_channel, quantize_per_token, quantize_weight_only, set_int8_kernel,
                        weight_memory)
from moge.train.trainer import TrainData


@torch.no_grad()
def evaluate(models: dict, data: TrainData, windows: int, batch_size: int) -> dict:
    """Per model: CE per domain and overall; per layer expert agreement of each model vs the first."""
    names = list(models)
    totals = {n: {} for n in names}
    agree = {n: None for n in names[1:]}
    for domain in data.domains:
        sums = dict.fromkeys(names, 0.0)
        tokens = 0
        for batch in data.val_batches(domain, windows, batch_size):
            x, y = batch[:, :-1], batch[:, 1:]
            outs = {n: m(x, return_routing=True) for n, m in models.items()}
            for n, out in outs.items():
                sums[n] += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                                           reduction="sum").item()
            tokens += y.numel()
            ref = outs[names[0]].routing
            for n in names[1:]:
                rows = []
                for r0, r1 in zip(ref, outs[n].routing):
                    N = r0.probs_TN.shape[-1]
                    m0 = torch.zeros(r0.experts_TK.shape[0], N, dtype=torch.bool).scatter_(1, r0.experts_TK, True)
                    m1 = torch.zeros_like(m0).scatter_(1, r1.experts_TK, True)
                    rows.append(((m0 & m1).sum().item(), r0.experts_TK.numel()))
                agree[n] = rows if agree[n] is None else [(a + c, b + d) for (a, b), (c, d) in zip(agree[n], rows)]
        for n in names:
            totals[n][domain] = (sums[n], tokens)
    out = {}
    for n in names:
        ce = {d: s / t for d, (s, t) in totals[n].items()}
        all_s = sum(s for s, _ in totals[n].values())
        all_t = sum(t for _, t in totals[n].values())
        out[n] = {"ce": ce, "ce_all": all_s / all_t, "ppl_all": math.exp(all_s / all_t), "tokens": all_t}
        if n in agree:
            out[n]["expert_agreement"] = [a / b for a, b in agree[n]]
    return out


@torch.no_grad()
def inject_outliers(model, channels: int = 4, factor: float = 20.0, seed: int = 0) -> None:
    """Give a few hidden channels `factor` times larger values after every RMSNorm and divide the
    readers' columns by the same factor: the float function is unchanged (it is smoothing run
    backwards), but the activations now have the outlier channels real LLMs have."""
    from moge.quant.smoothing import fold, moe_consumers

    gen = torch.Generator().manual_seed(seed)
    D = model.config.hidden_size
    for layer in model.model.layers:
        for norm, consumers in ((layer.input_layernorm, [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                                         layer.self_attn.v_proj.weight]),
                                (layer.post_attention_layernorm, None)):
            if consumers is None:
                router, gate_up, shared = moe_consumers(layer.mlp)
                consumers = [router, gate_up, *shared]
            s = torch.ones(D)
            s[torch.randperm(D, generator=gen)[:channels]] = 1.0 / factor
            fold(norm.weight, consumers, s)


def decode_speed(models: dict, prompts_by_batch: dict, new_tokens: int, reps: int) -> dict:
    res = {}
    for bs, prompts in prompts_by_batch.items():
        times = {n: [] for n in models}
        for _ in range(reps):
            for n, m in models.items():
                r = generate(m, prompts, max_new_tokens=new_tokens, sampling=Sampling(), stop_ids=[])
                times[n].append(r.decode_tokens_per_s)
        res[bs] = {n: statistics.median(v) for n, v in times.items()}
    return res


def _median_time(fn, reps: int, inner: int = 1) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def onednn_u8s8(x_q, w_q):
    """oneDNN's u8s8 -> fp32 GEMM (uint8 activations with zero point 128), or None if unavailable."""
    try:
        ones = torch.ones(w_q.shape[0])
        zeros = torch.zeros(w_q.shape[0], dtype=torch.long)
        packed = torch.ops.onednn.qlinear_prepack(w_q, list(x_q.shape))
        u = (x_q.to(torch.int16) + 128).to(torch.uint8)
        return lambda: torch.ops.onednn.qlinear_pointwise(u, 1.0, 128, packed, ones, zeros, None, 1.0, 0,
                                                          torch.float32, "none", [], "")
    except (RuntimeError, AttributeError):
        return None


@torch.no_grad()
def large_layer(dim: int, rows: list[int], reps: int) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(dim, dim) / dim**0.5
    q_w, s_w = quantize_per_channel(w)
    out = []
    for M in rows:
        x = torch.randn(M, dim)
        inner = max(1, 2048 // (M * max(1, dim // 256)))
        row = {"M": M, "D": dim}
        row["fp32_us"] = _median_time(lambda x=x: F.linear(x, w), reps, inner) * 1e6
        for kernel in ("int32", "int_mm"):
            set_int8_kernel(kernel)
            slow = kernel == "int_mm"
            row[f"w8a8_{kernel}_us"] = _median_time(lambda x=x: int8_linear(x, q_w, s_w), max(1, reps // 2) if slow
                                                    else reps, 1 if slow else inner) * 1e6
        set_int8_kernel("auto")
        q_x, _ = quantize_per_token(x)
        exact = int8_mm(q_x, q_w).double()
        f = onednn_u8s8(q_x, q_w)
        if f is not None:
            row["onednn_u8s8_us"] = _median_time(f, reps, inner) * 1e6
            row["onednn_max_abs_err_int8"] = float((f().double() - exact).abs().max())
            w7 = q_w.clamp(-64, 64)
            exact7 = int8_mm(q_x, w7).double()
            f7 = onednn_u8s8(q_x, w7)
            row["onednn_max_abs_err_7bit_weights"] = float((f7().double() - exact7).abs().max())
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/compare/runs/moge/seed-0/checkpoints/step-000300")
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--alpha", type=float, default=None, help="fixed migration strength (default: grid search)")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows per domain")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--outlier-factor", type=float, default=100.0, help="size of the injected outlier channels")
    p.add_argument("--large-dim", type=int, default=1024)
    p.add_argument("--skip", action="append", default=[], choices=["eval", "outliers", "decode", "large"])
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                             "torch": torch.__version__, "int8_kernel": int8_kernel()}}

    fp = load_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    calib = balanced_calibration_set(fp, args.data, windows=args.calib_windows, seq_len=args.seq_len, pool=args.pool)
    t1 = time.perf_counter()
    q = copy.deepcopy(fp)
    report = quantize_model(q, calib.input_ids, alpha=args.alpha)
    t2 = time.perf_counter()
    q.eval()
    res["calibration"] = calib.summary() | {"select_s": t1 - t0, "quantize_s": t2 - t1}
    res["alpha"] = {"attention": report.attention_alpha, "moe": report.moe_alpha}
    res["alignment"] = report.to_dict()
    mem_fp, mem_q = weight_memory(fp), weight_memory(q)
    res["memory"] = {"fp32": mem_fp, "w8a8": mem_q,
                     "quantized_matrices_ratio": mem_q["quantized_as_fp32_bytes"]
                     / (mem_q["quantized_int8_bytes"] + mem_q["quantized_scale_bytes"]),
                     "whole_model_ratio": mem_fp["total_bytes"] / mem_q["total_bytes"]}
    print(f"calibration: {calib.summary()['tokens']} tokens; per-expert min tokens per layer "
          f"{calib.summary()['per_expert_min_tokens']} (random windows: "
          f"{calib.summary()['random_windows_per_expert_min_tokens']}); quantize {t2 - t1:.1f} s")
    print(f"alpha per layer: attention {report.attention_alpha}, moe {report.moe_alpha}")
    print(f"weights: quantized matrices {mem_q['quantized_as_fp32_bytes']:,} B fp32 -> "
          f"{mem_q['quantized_int8_bytes'] + mem_q['quantized_scale_bytes']:,} B int8+scales "
          f"({res['memory']['quantized_matrices_ratio']:.2f}x); whole model {mem_fp['total_bytes']:,} -> "
          f"{mem_q['total_bytes']:,} B ({res['memory']['whole_model_ratio']:.2f}x)")

    weight_only = {}
    for name in ("int8-wo", "int4-wo"):
        weight_only[name.replace("-", "_")] = copy.deepcopy(fp)
        quantize_weight_only(weight_only[name.replace("-", "_")], name)
    if "eval" not in args.skip:
        data = TrainData(args.data, seq_len=args.seq_len)
        plain = copy.deepcopy(fp)
        quantize_model(plain)  # the same W8A8 without smoothing, for comparison
        ev = evaluate({"fp32": fp, "w8a8": q, "w8a8_unsmoothed": plain.eval(), **weight_only}, data,
                      args.val_windows, 16)
        res["eval"] = ev
        rel = ev["w8a8"]["ppl_all"] / ev["fp32"]["ppl_all"] - 1
        res["ppl_relative_change"] = rel
        res["ppl_relative_change_unsmoothed"] = ev["w8a8_unsmoothed"]["ppl_all"] / ev["fp32"]["ppl_all"] - 1
        for name in weight_only:
            res[f"ppl_relative_change_{name}"] = ev[name]["ppl_all"] / ev["fp32"]["ppl_all"] - 1
        print(f"\nvalidation ({ev['fp32']['tokens']} tokens):")
        print("| model | " + " | ".join(data.domains) + " | ppl (all) | ppl change | expert agreement per layer |")
        print("|---" * (len(data.domains) + 4) + "|")
        for name, e in ev.items():
            agree = ", ".join(f"{100 * a:.2f}%" for a in e.get("expert_agreement", []))
            change = f"{100 * (e['ppl_all'] / ev['fp32']['ppl_all'] - 1):+.3f}%"
            print(f"| {name} | " + " | ".join(f"{e['ce'][d]:.4f}" for d in data.domains)
                  + f" | {e['ppl_all']:.3f} | {change} | {agree or '-'} |")

    if "outliers" not in args.skip:
        data = TrainData(args.data, seq_len=args.seq_len)
        fo = copy.deepcopy(fp)
        inject_outliers(fo, factor=args.outlier_factor)
        calib_o = balanced_calibration_set(fo, args.data, windows=args.calib_windows, seq_len=args.seq_len,
                                           pool=args.pool)
        smoothed, plain = copy.deepcopy(fo), copy.deepcopy(fo)
        rep_o = quantize_model(smoothed, calib_o.input_ids, alpha=args.alpha)
        quantize_model(plain)
        ev = evaluate({"fp32": fo, "w8a8": smoothed.eval(), "w8a8_unsmoothed": plain.eval()}, data,
                      args.val_windows, 16)
        res["outliers"] = {"eval": ev, "alpha": {"attention": rep_o.attention_alpha, "moe": rep_o.moe_alpha}}
        print(f"\nthe same model with 4 outlier channels (x{args.outlier_factor:g}) after every norm "
              "(same float function):")
        print("| model | ppl (all) | ppl change | expert agreement per layer |\n|---|---|---|---|")
        for name, e in ev.items():
            agree = ", ".join(f"{100 * a:.2f}%" for a in e.get("expert_agreement", []))
            print(f"| {name} | {e['ppl_all']:.3f} | {100 * (e['ppl_all'] / ev['fp32']['ppl_all'] - 1):+.3f}% | "
                  f"{agree or '-'} |")
        print(f"alpha per layer: attention {rep_o.attention_alpha}, moe {rep_o.moe_alpha}")

    if "decode" not in args.skip:
        data = TrainData(args.data, seq_len=args.seq_len)
        batch = next(data.val_batches(data.domains[0], 16, 16))
        prompts = {1: [batch[0, :32].tolist()], 16: [row[:32].tolist() for row in batch]}
        sp = decode_speed({"fp32": fp, "w8a8": q, **weight_only}, prompts, args.new_tokens, args.reps)
        res["decode_tokens_per_s"] = {str(k): v for k, v in sp.items()}
        print(f"\ndecode tokens/s ({args.threads} thread(s), {args.new_tokens} new tokens, kernel {int8_kernel()}):")
        others = ["w8a8", *weight_only]
        print("| batch | fp32 | " + " | ".join(others) + " | " + " | ".join(f"{n} / fp32" for n in others) + " |")
        print("|---" * (2 + 2 * len(others)) + "|")
        for bs, v in sp.items():
            print(f"| {bs} | {v['fp32']:.1f} | " + " | ".join(f"{v[n]:.1f}" for n in others) + " | "
                  + " | ".join(f"{v[n] / v['fp32']:.2f}x" for n in others) + " |")

    if "large" not in args.skip:
        rows = large_layer(args.large_dim, [1, 16, 64, 256], args.reps)
        res["large_layer"] = rows
        d = args.large_dim
        print(f"\none linear [M, {d}] x [{d}, {d}] (us, {args.threads} thread(s)):")
        print("| M | fp32 | W8A8 int32 kernel | W8A8 torch._int_mm | oneDNN u8s8 "
              "| oneDNN max error (8-bit / 7-bit weights) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            one = f"{r['onednn_u8s8_us']:.0f}" if "onednn_u8s8_us" in r else "n/a"
            err = (f"{r['onednn_max_abs_err_int8']:.0f} / {r['onednn_max_abs_err_7bit_weights']:.0f}"
                   if "onednn_u8s8_us" in r else "n/a")
            print(f"| {r['M']} | {r['fp32_us']:.0f} | {r['w8a8_int32_us']:.0f} | {r['w8a8_int_mm_us']:.0f} "
                  f"| {one} | {err} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
