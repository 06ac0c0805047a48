"""`moge quantize`: W8A8 quantization of a checkpoint, calibrated on the corpus."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from moge.commands import list_argument
from moge.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


_grid = list_argument(float, lambda v: 0 <= v <= 1, "give one or more migration strengths in [0, 1]")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="W8A8-quantize a checkpoint (int8 weights and activations), calibrated on the corpus",
        description="Quantizes the attention projections, routed experts and shared expert of a checkpoint to "
                    "int8 weights (per output channel) with int8 activations (per token, dynamic); embeddings, "
                    "norms, the router and lm_head stay in floating point. Calibration windows come from the "
                    "corpus' training split, chosen so every expert receives tokens; activation outliers are "
                    "smoothed into the weights (expert-aware smoothing for the MoE input, arXiv 2505.21411) with "
                    "one migration strength per site chosen from --alpha-grid by how well the routers' logits "
                    "match the float model. Writes config.json (with quantization_config), model.safetensors "
                    "and the tokenizer to --out; `moge generate --model OUT` runs it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="float checkpoint directory (released layout)")
    p.add_argument("--data", default="data/corpus", help="prepared corpus for the calibration windows")
    p.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    p.add_argument("--alpha", type=float, default=None, help="fixed migration strength in [0, 1] (skips the search)")
    p.add_argument("--alpha-grid", type=_grid, default=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                   help="comma-separated migration strengths to choose from per site")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--pool", type=int, default=256, help="random windows to choose the balanced set from")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the calibration windows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from moge.checkpoint import load_pretrained
    from moge.checkpoint.quantized import save_quantized
    from moge.data.tokenizer_check import check_corpus_tokenizer
    from moge.quant import balanced_calibration_set, quantize_model, weight_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise ConfigError(f"--alpha={args.alpha} is invalid: the migration strength must be in [0, 1]")
    for name in ("calib_windows", "seq_len", "pool"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: "
                              "must be a positive integer")
    src, out = Path(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out={args.out!r} is the input checkpoint; choose another directory")
    model = load_pretrained(src, dtype=torch.float32).eval()
    check_corpus_tokenizer(args.data, src)
    if args.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"--seq-len={args.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    t0 = time.perf_counter()
    calib = balanced_calibration_set(model, args.data, windows=args.calib_windows, seq_len=args.seq_len,
                                     pool=args.pool, seed=args.seed)
    before = weight_memory(model)
    report = quantize_model(model, calib.input_ids, alpha=args.alpha, alpha_grid=args.alpha_grid)
    after = weight_memory(model)
    seconds = time.perf_counter() - t0
    summary = {"calibration": calib.summary(), **report.to_dict()}
    save_quantized(model, out, report=summary)
    for name in TOKENIZER_FILES:
        for folder in (src, Path(args.data)):
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
                break
    result = {"out": str(out), "seconds": seconds, "attention_alpha": report.attention_alpha,
              "moe_alpha": report.moe_alpha, "calibration": calib.summary(),
              "weight_bytes_before": before["total_bytes"], "weight_bytes_after": after["total_bytes"],
              "quantized_matrices_fp32_bytes": after["quantized_as_fp32_bytes"],
              "quantized_matrices_int8_bytes": after["quantized_int8_bytes"] + after["quantized_scale_bytes"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cal = calib.summary()
    print(f"calibrated on {cal['windows']} windows x {cal['seq_len']} tokens in {seconds:.1f} s")
    if "per_expert_min_tokens" in cal:
        print(f"fewest tokens any expert received, per layer: {cal['per_expert_min_tokens']} "
              f"(as many random windows: {cal['random_windows_per_expert_min_tokens']})")
    print(f"alpha per layer: attention {report.attention_alpha}, MoE {report.moe_alpha}")
    print(f"quantized matrices {result['quantized_matrices_fp32_bytes']:,} B (fp32) -> "
          f"{result['quantized_matrices_int8_bytes']:,} B (int8 + scales); whole model "
          f"{before['total_bytes']:,} -> {after['total_bytes']:,} B")
    print(f"wrote {out}")
    return 0
