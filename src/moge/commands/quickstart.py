"""`moge quickstart`: the main job. Prepare the corpus (cached), train the tiny MoGE model for a few
minutes, then print how evenly it spreads work over devices and a short generated sample."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="prepare data, train the tiny MoGE model, show its balance and a sample",
        description="The main job on built-in defaults: `moge data prepare` (cached after the first run), "
                    "`moge train` of moge-tiny (MoGE: 16 experts in 4 groups, one chosen per group) for "
                    "--steps steps, then the device balance of its routing on the validation text and a "
                    "generated sample. Re-running resumes or reuses the finished run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/corpus", help="corpus directory")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--steps", type=int, default=300, help="training steps (about 0.6 s each on 2 CPU cores)")
    p.add_argument("--prompt", default="ROMEO.", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=60, help="length of the generated sample")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moge.data.prepare import prepare
    from moge.inference.generate import Sampling, generate
    from moge.inference.tokenizer import load_tokenizer
    from moge.metrics import LoadTracker
    from moge.train.config import TrainConfig
    from moge.train.data import load_data
    from moge.train.trainer import Trainer

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    manifest = prepare(args.data, progress=not args.json, log=say)
    say(f"corpus: {args.data} ({'cached' if manifest.get('cached') else 'built'})")
    cfg = TrainConfig(data=args.data, out=args.out, steps=args.steps, eval_every=max(1, args.steps // 3),
                      save_every=max(1, args.steps // 3))
    data = load_data(cfg)
    trainer = Trainer(cfg, data, log=say)
    if trainer.resume():
        say(f"resuming {args.out} at step {trainer.step}")
    if trainer.step < cfg.steps:
        summary = trainer.fit(progress=not args.json)
        if summary["interrupted"]:
            return 130
    model = trainer.model.eval()
    mc = trainer.model_cfg
    tracker = LoadTracker(mc.num_experts, mc.num_groups, track_coactivation=True)
    with torch.no_grad():
        for domain in data.domains:
            for batch in data.val_batches(domain, 32, 16):
                out = model(batch[:, :-1], return_routing=True)
                for i, r in enumerate(out.routing):
                    tracker.update(r.experts_TK, layer=i)
    balance = tracker.summary()
    val = trainer.evaluate()
    tok = load_tokenizer(data.tokenizer_path)
    ids = tok.encode(args.prompt)
    res = generate(model, [ids], max_new_tokens=args.max_new_tokens,
                   sampling=Sampling(temperature=0.8, top_k=50, top_p=0.95, seed=0), stop_ids=[data.eos_id])
    sample = tok.decode(res.tokens[0])
    result = {"run": args.out, "steps": trainer.step, "validation_loss": val,
              "balance": {str(k): {"imbalance_score_mean": v["imbalance_score_mean"],
                                   "device_max_over_mean": v["devices"]["max_over_mean"],
                                   "busiest_expert_share": v["experts"]["max_share"],
                                   "dead_experts": v["experts"]["dead"],
                                   "same_group_coactivations": v["coactivation_same_group"]}
                          for k, v in balance.items()},
              "prompt": args.prompt, "sample": sample, "decode_tokens_per_s": res.decode_tokens_per_s}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"\nmoge-tiny after {trainer.step} steps; validation loss (nats/token): "
          + ", ".join(f"{d} {v:.3f}" for d, v in val.items()))
    print(f"\nDevice balance on the validation text ({mc.num_groups} devices, one expert group each):")
    print(f"{'layer':>5} {'mean IS':>8} {'device max/mean':>16} {'busiest expert':>15} {'dead experts':>13}")
    for layer, v in result["balance"].items():
        print(f"{layer:>5} {v['imbalance_score_mean']:8.3f} {v['device_max_over_mean']:16.3f} "
              f"{v['busiest_expert_share']:15.1%} {v['dead_experts']:13d}")
    print(f"\nSample ({res.decode_tokens_per_s:.0f} tokens/s):\n{args.prompt}{sample}")
    print(f"\nNext: moge compare (MoGE vs top-K vs dense), moge analyze --ckpt {trainer.latest_checkpoint()}")
    return 0
