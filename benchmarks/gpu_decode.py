"""Decode speed on one CUDA GPU: eager against the compiled static-cache step (CUDA graphs), and
transformers' Qwen2-MoE of the same sizes when it is installed, interleaved in this one process.

For each batch size: prefill tokens/s over a 128-token prompt, and greedy decode tokens/s and
milliseconds per step over `--new-tokens`, median of `--reps`. Batch-1 decode is also reported
against the memory-bandwidth floor: the activated weights' bytes over the device's copy bandwidth
measured here. Prints a table, `--json` for the numbers.

    python benchmarks/gpu_decode.py --preset moge-small --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moge.config import PRESETS  # noqa: E402
from moge.inference.generate import generate  # noqa: E402
from moge.nn.model import PanguProMoEForCausalLM  # noqa: E402


def copy_bandwidth_gbs(device, mbytes: int = 2048) -> float:
    """Device memory bandwidth: a large copy (read + write counted), best of 5."""
    src = torch.empty(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * src.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9)
    return best


def time_ours(model, prompts, new_tokens: int, compile: bool) -> tuple[float, float, float]:
    r = generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[], compile=compile)
    return r.prefill_tokens_per_s, r.decode_tokens_per_s, 1000 * r.decode_s / max(r.decode_steps, 1)


@torch.inference_mode()
def time_theirs(model, ids, new_tokens: int) -> tuple[float, float, float]:
    mask = torch.ones_like(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids, attention_mask=mask, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    decode = max(time.perf_counter() - t0 - prefill, 1e-9)
    B = ids.shape[0]
    return B * ids.shape[1] / prefill, B * (new_tokens - 1) / decode, 1000 * decode / (new_tokens - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moge-small")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode: needs a CUDA device")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    ours = PanguProMoEForCausalLM(cfg).eval().to(device, dtype)
    counts = ours.num_parameters()
    active_bytes = (counts["activated"] - cfg.vocab_size * cfg.hidden_size) * dtype.itemsize
    bw = copy_bandwidth_gbs(device)
    peers = {}
    if not args.no_peer:
        try:
            from generate import build_theirs, copy_weights

            theirs = build_theirs(cfg, "grouped_mm", 0)
            copy_weights(ours.float().cpu(), theirs)
            ours.to(device, dtype)
            peers["hf"] = theirs.to(device, dtype).eval()
        except Exception as e:  # noqa: BLE001 (the peer is optional; say why it is missing)
            print(f"transformers peer unavailable: {type(e).__name__}: {e}")
            ours.to(device, dtype)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.preset} {args.dtype}: "
          f"{counts['total'] / 1e6:.1f}M total / {counts['activated'] / 1e6:.1f}M activated; copy bandwidth "
          f"{bw:.0f} GB/s; batch-1 floor {active_bytes / bw / 1e6:.4f} ms per token")
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "preset": args.preset,
               "dtype": args.dtype, "copy_gbs": bw, "active_weight_bytes": active_bytes, "batches": {}}
    gen = torch.Generator().manual_seed(1)
    for B in args.batches:
        ids = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=gen)
        prompts = ids.tolist()
        runs = {"eager": lambda n, p=prompts: time_ours(ours, p, n, False),
                "compiled": lambda n, p=prompts: time_ours(ours, p, n, True)}
        for name, model in peers.items():
            runs[name] = lambda n, m=model, x=ids.to(device): time_theirs(m, x, n)
        t0 = time.perf_counter()
        for fn in runs.values():  # warm-up (the compiled row compiles and captures here)
            fn(args.new_tokens)
        warm_s = time.perf_counter() - t0
        samples = {k: [] for k in runs}
        for _ in range(args.reps):
            for name, fn in runs.items():
                samples[name].append(fn(args.new_tokens))
        row = {}
        for name, xs in samples.items():
            pf, dec, ms = (statistics.median(x[i] for x in xs) for i in range(3))
            row[name] = {"prefill_tok_s": pf, "decode_tok_s": dec, "decode_ms_per_step": ms}
        results["batches"][B] = row
        print(f"\nbatch {B} (warm-up incl. compile {warm_s:.1f} s)")
        print(f"{'':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} {'vs eager':>9}")
        for name, r in row.items():
            print(f"{name:<10} {r['prefill_tok_s']:14.0f} {r['decode_tok_s']:13.0f} {r['decode_ms_per_step']:8.3f} "
                  f"{r['decode_tok_s'] / row['eager']['decode_tok_s']:8.2f}x")
        if B == 1:
            floor_ms = active_bytes / bw / 1e6  # bytes / (GB/s) = ns; / 1e6 = ms
            share = floor_ms / row["compiled"]["decode_ms_per_step"]
            print(f"batch-1 compiled step = {share:.1%} of the bandwidth floor")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
