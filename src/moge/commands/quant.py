"""`moge quantize`: W8A8 quantization of a checkpoint, calibrated on the corpus, or weight-only
int8 / int4 (round-to-nearest, no calibration: `--scheme int8-wo|int4-wo`)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch

from moge.commands import list_argument
from moge.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


SCHEMES = ("w8a8", "int8-wo", "int4-wo")

_grid = list_argument(float, lambda v: 0 <= v <= 1, "give one or more migration strengths in [0, 1]")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a checkpoint: W8A8 (int8 weights and activations, calibrated on the corpus) or "
                         "weight-only int8 / int4",
        description="Quantizes the attention projections, routed experts and shared expert of a checkpoint to "
                    "int8 weights (per output channel) with int8 activations (per token, dynamic); embeddings, "
                    "norms, the router and lm_head stay in floating point. Calibration windows come from the "
                    "corpus' training split, chosen so every expert receives tokens; activation outliers are "
                    "smoothed into the weights (expert-aware smoothing for the MoE input, arXiv 2505.21411) with "
                    "one migration strength per site chosen from --alpha-grid by how well the routers' logits "
                    "match the float model. --scheme int8-wo / int4-wo instead quantizes the same matrices to "
                    "int8 (per output channel) or int4 (per group of --group-size inputs) weights with float "
                    "activations, round-to-nearest without calibration, for fast CPU decoding, and reports the "
                    "perplexity change on the corpus' validation split and how often the quantized model selects "
                    "the float model's experts. Writes config.json (with quantization_config), model.safetensors "
                    "and the tokenizer to --out; `moge generate --model OUT` runs it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="float checkpoint directory (released layout)")
    p.add_argument("--data", default="data/corpus", help="prepared corpus for the calibration windows")
    p.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    p.add_argument("--scheme", default="w8a8", help=f"quantization scheme: one of {', '.join(SCHEMES)}")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4-wo: inputs per scale (a multiple of 32 dividing every quantized input dim; default 32)")
    p.add_argument("--asymmetric", action="store_true",
                   help="int4-wo: a scale and a zero point per group (default: symmetric, as GGUF q4_0)")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="weight-only: validation windows per corpus domain for the perplexity check (0: skip)")
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
    if args.scheme not in SCHEMES:
        raise ConfigError(f"--scheme={args.scheme!r} is invalid: choose one of {', '.join(SCHEMES)}")
    if args.scheme != "int4-wo" and (args.group_size is not None or args.asymmetric):
        flag = "--group-size" if args.group_size is not None else "--asymmetric"
        raise ConfigError(f"{flag} applies to --scheme int4-wo only, not --scheme {args.scheme}")
    if args.scheme != "w8a8":
        return _run_weight_only(args)
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


def _copy_tokenizer(src: Path, data: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        for folder in (src, data):
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
                break


def _run_weight_only(args: argparse.Namespace) -> int:
    from moge.checkpoint import load_pretrained
    from moge.checkpoint.quantized import save_quantized
    from moge.data.tokenizer_check import check_corpus_tokenizer
    from moge.quant import quantize_weight_only
    from moge.kernels import gemv
    from moge.quant.weight_only import DEFAULT_GROUP_SIZE

    if args.eval_windows < 0:
        raise ConfigError(f"--eval-windows={args.eval_windows} is invalid: give 0 (skip) or a positive integer")
    if args.seq_len <= 0:
        raise ConfigError(f"--seq-len={args.seq_len} is invalid: must be a positive integer")
    src, out = Path(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out={args.out!r} is the input checkpoint; choose another directory")
    model = load_pretrained(src, dtype=torch.float32).eval()
    if args.eval_windows:
        check_corpus_tokenizer(args.data, src)
    group = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    t0 = time.perf_counter()
    quantized = copy.deepcopy(model)
    names = quantize_weight_only(quantized, args.scheme, group_size=group, symmetric=not args.asymmetric)
    seconds = time.perf_counter() - t0
    result: dict = {"out": str(out), "scheme": args.scheme, "seconds": seconds,
                    "quantized_linear": len(names["linear"]), "quantized_experts": len(names["experts"]),
                    "weight_bytes_before": _bytes(model), "weight_bytes_after": _bytes(quantized),
                    "kernel": gemv.kernel()}
    if args.scheme == "int4-wo":
        result |= {"group_size": group, "symmetric": not args.asymmetric}
    if args.eval_windows:
        if args.seq_len > model.config.max_position_embeddings:
            raise ConfigError(f"--seq-len={args.seq_len} exceeds the model's max_position_embeddings="
                              f"{model.config.max_position_embeddings}")
        result["eval"] = evaluate_quantized(model, quantized, args.data, args.eval_windows, args.seq_len)
    save_quantized(quantized, out, report={k: v for k, v in result.items() if k in ("eval", "seconds")})
    _copy_tokenizer(src, Path(args.data), out)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    extra = f", group size {group}, {'symmetric' if not args.asymmetric else 'asymmetric'}" \
        if args.scheme == "int4-wo" else ""
    print(f"{args.scheme}{extra}: quantized {result['quantized_linear']} linear layers and "
          f"{result['quantized_experts']} expert stacks in {seconds:.1f} s; weights "
          f"{result['weight_bytes_before']:,} -> {result['weight_bytes_after']:,} B (kernel: {result['kernel']})")
    if "eval" in result:
        ev = result["eval"]
        agree = ", ".join(f"{100 * a:.2f}%" for a in ev["expert_agreement"])
        print(f"validation ({ev['tokens']} tokens): perplexity {ev['ppl_float']:.3f} -> {ev['ppl_quantized']:.3f} "
              f"({100 * ev['ppl_relative_change']:+.3f}%); expert agreement per layer: {agree or '-'}")
    print(f"wrote {out}")
    return 0


def _bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def evaluate_quantized(float_model: torch.nn.Module, quantized: torch.nn.Module, data_dir: str | Path,
                       windows: int, seq_len: int, batch_size: int = 16) -> dict:
    """Perplexity of both models on the same validation windows (every domain of the corpus), and
    per layer the share of the float model's selected experts that the quantized model selects too
    (each model routes in its own forward pass, so upstream errors count), as benchmarks/quant.py."""
    from moge.train.data import TrainData

    data = TrainData(data_dir, seq_len=seq_len)
    nll = {"float": 0.0, "quantized": 0.0}
    tokens = 0
    agree: list[list[int]] = []
    for domain in data.domains:
        for batch in data.val_batches(domain, windows, batch_size):
            x, y = batch[:, :-1], batch[:, 1:]
            outs = {"float": float_model(x, return_routing=True), "quantized": quantized(x, return_routing=True)}
            for name, o in outs.items():
                nll[name] += torch.nn.functional.cross_entropy(o.logits.reshape(-1, o.logits.shape[-1]).float(),
                                                               y.reshape(-1), reduction="sum").item()
            tokens += y.numel()
            for i, (r0, r1) in enumerate(zip(outs["float"].routing, outs["quantized"].routing)):
                n = r0.probs_TN.shape[-1]
                m0 = torch.zeros(r0.experts_TK.shape[0], n, dtype=torch.bool).scatter_(1, r0.experts_TK, True)
                m1 = torch.zeros_like(m0).scatter_(1, r1.experts_TK, True)
                if len(agree) <= i:
                    agree.append([0, 0])
                agree[i][0] += int((m0 & m1).sum())
                agree[i][1] += r0.experts_TK.numel()
    if not tokens:
        raise ConfigError(f"the corpus at {data_dir} has no validation windows of {seq_len} tokens")
    ppl = {k: math.exp(v / tokens) for k, v in nll.items()}
    return {"tokens": tokens, "windows_per_domain": windows, "ppl_float": ppl["float"],
            "ppl_quantized": ppl["quantized"], "ppl_relative_change": ppl["quantized"] / ppl["float"] - 1,
            "expert_agreement": [a / b for a, b in agree]}
