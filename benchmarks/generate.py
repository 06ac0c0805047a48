"""Generation speed: our model against Hugging Face transformers' Qwen2-MoE of identical sizes.

Both run in this one process, interleaved, fp32 on CPU: prefill tokens/s (one forward over the
prompt, logits of the last position only) and decode tokens/s (a timed greedy generation of a
fixed number of new tokens, minus the prefill), at batch 1 and batch 16. Rows `moge-int8` and
`moge-int4` are the same model with weight-only int8 / int4 weights (moge.quant.weight_only,
quantized in process, group size 32, symmetric), `moge-w8a8` with W8A8 (moge.quant, without
calibration), all timed interleaved with the rest; `--compile` adds
rows `<row>-compiled`, the same models decoding with the compiled static-cache step
(moge.inference.compiled; prefill stays eager, so only decode differs). Prints medians and
ratios (ours / theirs, >1 means we are faster), writes `--out FILE.json`, and reports batch-1
decode against the memory-bandwidth floor: the bytes of the activated weights each token must
read (activated parameters minus the embedding table, fp32) over a bandwidth measured here
(against `moge-compiled` when it runs).

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/generate.py --threads 2 --out generate.json

The peer is the closest transformers architecture: Qwen2-MoE has q/k/v biases and a shared
expert. Differences that remain, and are small: Qwen2-MoE has no o_proj bias and gates its shared
expert with a per-token sigmoid (one extra D-vector per layer), and routes by plain top-K over all
experts where ours routes top-K/M inside each of M groups (MoGE). Both get the same weights (ours,
copied), so both spread tokens over the experts alike and read the same number of expert weights;
the distinct experts per layer are printed as a check. The peer's experts kernel is chosen per
run (`--hf-experts`, via `config._experts_implementation`) and its fastest is the reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import torch

from moge.config import PRESETS, ModelConfig
from moge.inference.generate import Sampling, generate
from moge.inference.threads import ThreadTuner
from moge.nn.model import KVCache, PanguProMoEForCausalLM
from moge.kernels import gemv
from moge.quant import int8_kernel, quantize_model
from moge.quant.weight_only import quantize_weight_only

QUANTIZED = {"int8": "int8-wo", "int4": "int4-wo", "w8a8": "w8a8"}


def build_ours(cfg: ModelConfig, seed: int) -> PanguProMoEForCausalLM:
    torch.manual_seed(seed)
    return PanguProMoEForCausalLM(cfg).eval()


def build_quantized(ours: PanguProMoEForCausalLM, name: str) -> PanguProMoEForCausalLM:
    """A quantized copy of our model, round-to-nearest: weight-only int8 or int4, or W8A8."""
    import copy

    model = copy.deepcopy(ours)
    if QUANTIZED[name] == "w8a8":  # without calibration data: plain per-token/per-channel int8
        quantize_model(model)
    else:
        quantize_weight_only(model, QUANTIZED[name])
    return model.eval()


def build_theirs(cfg: ModelConfig, experts_impl: str, seed: int):
    """transformers Qwen2MoeForCausalLM with our sizes (norm_topk_prob off, as our router)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    qcfg = Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.expert_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        intermediate_size=cfg.expert_intermediate_size,
        norm_topk_prob=False, qkv_bias=cfg.attention_bias, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=cfg.bos_token_id, eos_token_id=None, pad_token_id=cfg.pad_token_id,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
    )
    qcfg._experts_implementation = experts_impl
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(qcfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = cfg.pad_token_id
    return model


@torch.no_grad()
def copy_weights(ours: PanguProMoEForCausalLM, theirs) -> None:
    """Give the peer our weights, so both route tokens alike and read the same experts. (With its
    own random init Qwen2-MoE sends most tokens to a few experts, which flatters its speed.) Its
    shared-expert gate has no counterpart here and stays as initialised."""
    theirs.model.embed_tokens.weight.copy_(ours.model.embed_tokens.weight)
    theirs.model.norm.weight.copy_(ours.model.norm.weight)
    theirs.lm_head.weight.copy_(ours.lm_head.weight)
    for a, b in zip(ours.model.layers, theirs.model.layers):
        b.input_layernorm.weight.copy_(a.input_layernorm.weight)
        b.post_attention_layernorm.weight.copy_(a.post_attention_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src, dst = getattr(a.self_attn, name), getattr(b.self_attn, name)
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)
        b.mlp.gate.weight.copy_(a.mlp.router.gate.weight)
        b.mlp.experts.gate_up_proj.copy_(a.mlp.experts.gate_up_proj)
        b.mlp.experts.down_proj.copy_(a.mlp.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(b.mlp.shared_expert, name).weight.copy_(getattr(a.mlp.shared_expert, name).weight)


def active_experts(model, ids: torch.Tensor, ours: bool) -> float:
    """Mean number of distinct routed experts per layer over one forward of `ids`."""
    seen: list[int] = []

    def hook(module, inputs, output):
        experts = output.experts_TK if ours else output[2]
        seen.append(int(torch.unique(experts).numel()))

    routers = [layer.mlp.router if ours else layer.mlp.gate for layer in model.model.layers]
    handles = [r.register_forward_hook(hook) for r in routers]
    with torch.inference_mode():
        model(ids)
    for h in handles:
        h.remove()
    return sum(seen) / len(seen)


def memory_bandwidth_gbs(mbytes: int = 512, reps: int = 5) -> dict[str, float]:
    """Read bandwidth (sum of a large fp32 tensor) and copy bandwidth (read + write counted)."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    src.sum(), dst.copy_(src)  # fault the pages in
    read, copy = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        read.append(src.numel() * 4 / (t1 - t0) / 1e9)
        copy.append(2 * src.numel() * 4 / (t2 - t1) / 1e9)
    return {"read_gbs": max(read), "copy_gbs": max(copy)}


@torch.inference_mode()
def prefill_ours(model: PanguProMoEForCausalLM, ids: torch.Tensor) -> float:
    cache = KVCache.allocate(model.config, ids.shape[0], ids.shape[1] + 1, torch.float32)
    t0 = time.perf_counter()
    model(ids, cache=cache, logits_slice=slice(-1, None))
    return time.perf_counter() - t0


@torch.inference_mode()
def prefill_theirs(model, ids: torch.Tensor) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def generate_ours(model: PanguProMoEForCausalLM, ids: torch.Tensor, new_tokens: int,
                  threads: ThreadTuner | None = None, compile: bool = False) -> float:
    prompts = ids.tolist()
    t0 = time.perf_counter()
    result = generate(model, prompts, max_new_tokens=new_tokens, sampling=Sampling(), stop_ids=[], threads=threads,
                      compile=compile)
    elapsed = time.perf_counter() - t0
    assert all(len(t) == new_tokens for t in result.tokens)
    return elapsed


@torch.inference_mode()
def generate_theirs(model, ids: torch.Tensor, new_tokens: int) -> float:
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def bench_batch(ours, theirs: dict, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                reps: int, seed: int, quantized: dict | None = None, tune: bool = True, compiled: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=gen)
    contenders = {"moge": (ours, prefill_ours, generate_ours)}
    contenders.update({f"moge-{name}": (m, prefill_ours, generate_ours) for name, m in (quantized or {}).items()})
    if compiled:  # the same models decoding with the compiled static-cache step (the warm-up compiles)
        compile_ours = functools.partial(generate_ours, compile=True)
        contenders.update({f"{name}-compiled": (m, pf, compile_ours) for name, (m, pf, _) in list(contenders.items())})
    # ours pick their decode thread count by timing (as `moge generate --threads auto` does), up to
    # the benchmark's thread count; one tuner per model lives across the repetitions like a server's
    fixed = torch.get_num_threads()
    tuners = {name: ThreadTuner(fixed) for name in contenders if tune and name.startswith("moge")}
    contenders.update({f"hf-{impl}": (m, prefill_theirs, generate_theirs) for impl, m in theirs.items()})
    prefill: dict[str, list[float]] = {k: [] for k in contenders}
    total: dict[str, list[float]] = {k: [] for k in contenders}
    def run(name, model, pf, gn, n):
        torch.set_num_threads(fixed)  # prefill and the peer always at the fixed count
        p = pf(model, ids)
        g = gn(model, ids, n, tuners[name]) if name in tuners else gn(model, ids, n)
        torch.set_num_threads(fixed)
        return p, g

    for name, (model, pf, gn) in contenders.items():  # warm-up
        run(name, model, pf, gn, 2)
    for _ in range(reps):
        for name, (model, pf, gn) in contenders.items():
            p, g = run(name, model, pf, gn, new_tokens)
            prefill[name].append(p)
            total[name].append(g)
    out = {}
    for name in contenders:
        p = statistics.median(prefill[name])
        g = statistics.median(total[name])
        decode_s = max(g - p, 1e-9)
        out[name] = {
            "prefill_s": p, "generate_s": g,
            "prefill_tok_s": batch * prompt_len / p,
            # the first new token comes from the prefill; the other new_tokens - 1 from decode steps
            "decode_tok_s": batch * (new_tokens - 1) / decode_s,
            "decode_ms_per_step": 1000 * decode_s / (new_tokens - 1),
        }
        if name in tuners:
            out[name]["decode_threads"] = tuners[name].summary()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moge-small")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-experts", nargs="+", default=["eager", "grouped_mm"],
                   help="transformers experts implementations to try (config._experts_implementation)")
    p.add_argument("--quantized", nargs="*", default=list(QUANTIZED), choices=list(QUANTIZED),
                   help="weight-only copies of our model to time as rows moge-<name>")
    p.add_argument("--compile", action="store_true",
                   help="add rows <ours>-compiled: each of our models decoding with the compiled static-cache step "
                        "(generate(compile=True)); the warm-up run compiles")
    p.add_argument("--fixed-threads", action="store_true",
                   help="decode ours at exactly --threads (default: tuned by timing, at most --threads)")
    p.add_argument("--load", type=int, default=0,
                   help="background processes kept busy during the measurement (one thread each, a float "
                        "matmul loop: another job on the same cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = PRESETS[args.preset]
    ours = build_ours(cfg, args.seed)
    quantized = {name: build_quantized(ours, name) for name in args.quantized}
    theirs = {impl: build_theirs(cfg, impl, args.seed) for impl in args.hf_experts}
    for model in theirs.values():
        copy_weights(ours, model)
    counts = cfg.parameter_counts()
    hf_params = sum(p.numel() for p in next(iter(theirs.values())).parameters())
    bandwidth = memory_bandwidth_gbs()  # measured again at the end; the better of the two is kept
    active_bytes = (counts["activated"] - counts["embedding"]) * 4

    results = {"preset": args.preset, "threads": args.threads, "cpu_count": os.cpu_count(),
               "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "reps": args.reps, "torch": torch.__version__,
               "machine": platform.machine(), "processor": platform.processor(),
               "params": {"moge_total": counts["total"], "moge_activated": counts["activated"], "hf_total": hf_params},
               "bandwidth": bandwidth, "active_weight_bytes_per_token": active_bytes, "batches": {}}
    results["gemv_kernel"] = gemv.kernel()
    results["int8_kernel"] = int8_kernel()
    print(f"{args.preset}: {counts['total'] / 1e6:.1f}M total / {counts['activated'] / 1e6:.1f}M activated "
          f"(transformers peer {hf_params / 1e6:.1f}M); threads={args.threads} of {os.cpu_count()} CPUs, "
          f"prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.reps}")
    results["background_load"] = args.load
    results["decode_threads"] = "fixed" if args.fixed_threads else "tuned"
    load = start_load(args.load)
    try:
        run_batches(args, cfg, ours, theirs, quantized, results)
    finally:
        for proc in load:
            proc.terminate()
    again = memory_bandwidth_gbs()
    bandwidth = {k: max(v, again[k]) for k, v in bandwidth.items()}
    results["bandwidth"] = bandwidth
    if "1" in results["batches"]:
        row = "moge-compiled" if args.compile else "moge"
        step_s = results["batches"]["1"][row]["decode_ms_per_step"] / 1000
        floor_s = active_bytes / (bandwidth["read_gbs"] * 1e9)
        results["bandwidth_floor"] = {"floor_ms_per_token": 1000 * floor_s, "fraction_of_floor": floor_s / step_s,
                                      "row": row}
        print(f"memory bandwidth: read {bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s")
        print(f"batch-1 decode ({row}): {1000 * step_s:.1f} ms/token; floor {1000 * floor_s:.1f} ms/token "
              f"({active_bytes / 1e6:.0f} MB of activated weights at {bandwidth['read_gbs']:.1f} GB/s): "
              f"{100 * floor_s / step_s:.0f}% of the bandwidth floor")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def _busy() -> None:
    torch.set_num_threads(1)
    a = torch.rand(512, 512)
    while True:
        a = (a @ a).clamp_(-1, 1)


def start_load(n: int) -> list:
    """n processes that keep one core each busy until terminated."""
    import multiprocessing as mp

    procs = [mp.get_context("spawn").Process(target=_busy, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    if procs:
        time.sleep(3.0)  # let them start spinning
    return procs


def run_batches(args, cfg, ours, theirs, quantized, results) -> None:
    for batch in args.batches:
        res = bench_batch(ours, theirs, cfg, batch, args.prompt_len, args.new_tokens, args.reps, args.seed, quantized,
                          tune=not args.fixed_threads, compiled=args.compile)
        probe = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
        res["active_experts_per_layer"] = {"moge": active_experts(ours, probe, True),
                                           "hf": active_experts(next(iter(theirs.values())), probe, False)}
        best = max((k for k in res if k.startswith("hf-")), key=lambda k: res[k]["decode_tok_s"])
        best_pf = max((k for k in res if k.startswith("hf-")), key=lambda k: res[k]["prefill_tok_s"])
        res["ratios"] = {"prefill": res["moge"]["prefill_tok_s"] / res[best_pf]["prefill_tok_s"],
                         "decode": res["moge"]["decode_tok_s"] / res[best]["decode_tok_s"],
                         "prefill_vs": best_pf, "decode_vs": best}
        for name in quantized:  # weight-only against our own fp32 model, same process, interleaved
            res["ratios"][f"{name}_decode_vs_fp32"] = res[f"moge-{name}"]["decode_tok_s"] / res["moge"]["decode_tok_s"]
            res["ratios"][f"{name}_prefill_vs_fp32"] = (res[f"moge-{name}"]["prefill_tok_s"]
                                                        / res["moge"]["prefill_tok_s"])
            if args.compile:  # both compiled
                res["ratios"][f"{name}_compiled_decode_vs_fp32_compiled"] = (
                    res[f"moge-{name}-compiled"]["decode_tok_s"] / res["moge-compiled"]["decode_tok_s"])
        if args.compile:
            res["ratios"]["compiled_decode_vs_eager"] = (res["moge-compiled"]["decode_tok_s"]
                                                         / res["moge"]["decode_tok_s"])
            res["ratios"]["compiled_decode_vs_theirs"] = (res["moge-compiled"]["decode_tok_s"]
                                                          / res[best]["decode_tok_s"])
        results["batches"][str(batch)] = res
        print(f"batch {batch}:")
        for name in [k for k in res if k not in ("ratios", "active_experts_per_layer")]:
            r = res[name]
            print(f"  {name:16s} prefill {r['prefill_tok_s']:9.1f} tok/s   decode {r['decode_tok_s']:8.1f} tok/s "
                  f"({r['decode_ms_per_step']:.1f} ms/step)")
        act = res["active_experts_per_layer"]
        print(f"  distinct experts per layer over the prompt: ours {act['moge']:.1f}, theirs {act['hf']:.1f} "
              f"of {cfg.num_experts}")
        print(f"  ours/theirs: prefill {res['ratios']['prefill']:.2f}x (vs {best_pf}), "
              f"decode {res['ratios']['decode']:.2f}x (vs {best})")
        for name in quantized:
            print(f"  moge-{name}/moge (fp32): decode {res['ratios'][f'{name}_decode_vs_fp32']:.2f}x, "
                  f"prefill {res['ratios'][f'{name}_prefill_vs_fp32']:.2f}x")
            if args.compile:
                print(f"  moge-{name}-compiled/moge-compiled: decode "
                      f"{res['ratios'][f'{name}_compiled_decode_vs_fp32_compiled']:.2f}x")
        if args.compile:
            print(f"  moge-compiled/moge: decode {res['ratios']['compiled_decode_vs_eager']:.2f}x; "
                  f"moge-compiled/theirs {res['ratios']['compiled_decode_vs_theirs']:.2f}x")


if __name__ == "__main__":
    main()
