"""Training tokens/s: our moge-tiny against transformers' Qwen2-MoE with identical sizes.

Both train with AdamW on the same random token batches (fp32, CPU), interleaved step by step in
one process; medians over the timed steps. transformers runs each of its experts implementations
and the fastest is the reference. Ratios > 1 mean we are faster.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/train.py --threads 2

Differences that remain between the two models (the closest transformers architecture): Qwen2-MoE
has no o_proj bias, gates its shared expert with a sigmoid, and routes with softmax-then-top-K;
ours is MoGE (top-1 in each of 4 groups) with an un-gated shared expert and the aux loss computed
from the same routing outputs. Same parameter count to within the o_proj bias and shared gate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from moge.nn.losses import aux_loss
from moge.config import PRESETS
from moge.nn.model import PanguProMoEForCausalLM


def hf_model(cfg, impl: str):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hc = Qwen2MoeConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                        moe_intermediate_size=cfg.expert_intermediate_size,
                        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                        intermediate_size=cfg.expert_intermediate_size, norm_topk_prob=False,
                        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                        output_router_logits=True, router_aux_loss_coef=0.01)
    hc._experts_implementation = impl
    hc._attn_implementation = "sdpa"
    return Qwen2MoeForCausalLM(hc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--impls", nargs="+", default=["eager", "grouped_mm"])
    p.add_argument("--out", help="write JSON results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS["moge-tiny"]
    models = {"moge": PanguProMoEForCausalLM(cfg).init_weights(seed=0)}
    for impl in args.impls:
        models[f"hf-{impl}"] = hf_model(cfg, impl)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), foreach=False)
            for n, m in models.items()}
    params = {n: sum(q.numel() for q in m.parameters()) for n, m in models.items()}

    def step(name: str, batch: torch.Tensor) -> None:
        model, opt = models[name], opts[name]
        opt.zero_grad(set_to_none=True)
        x, y = batch[:, :-1], batch[:, 1:]
        if name == "moge":
            out = model(x, return_routing=True)
            loss = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
            loss = loss + 0.01 * torch.stack([aux_loss(r.probs_TN, r.experts_TK) for r in out.routing]).mean()
        else:
            loss = model(input_ids=x, labels=y, use_cache=False).loss  # includes its aux loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    gen = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {n: [] for n in models}
    for i in range(args.steps + 2):
        batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
        for name in models:
            t0 = time.perf_counter()
            step(name, batch)
            if i >= 2:
                samples[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    tps = {n: tokens / statistics.median(s) for n, s in samples.items()}
    hf = {n: v for n, v in tps.items() if n.startswith("hf-")}
    fastest = max(hf, key=hf.get)
    result = {"threads": args.threads, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_s": tps,
              "params": params, "hf_fastest": fastest, "speedup_vs_hf_fastest": tps["moge"] / hf[fastest],
              "torch": torch.__version__, "machine": platform.machine()}
    for n, v in tps.items():
        print(f"{n:16} {v:9.0f} tokens/s  ({params[n] / 1e6:.2f}M params)")
    print(f"moge / {fastest}: {result['speedup_vs_hf_fastest']:.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
