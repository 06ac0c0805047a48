"""`moge sft`, `moge rl` and `moge task` (the verifiable task family: make its data, measure accuracy)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from moge.commands.train import add_train_arguments, train_config_from_args

SFT_HELP = {
    "init": "checkpoint to fine-tune (required)",
    "batch_size": "packed rows per micro-batch",
    "seq_len": "tokens per packed row (a longer conversation is an error)",
    "save_every": "checkpoint every N steps (all kept up to --keep-checkpoints, for moge merge)",
}
RL_HELP = {
    "init": "checkpoint to start from (required)",
    "prompts": "JSONL of {messages, answer}: the RL prompts",
    "prompts_per_step": "prompts per step (P)",
    "group_size": "completions sampled per prompt (G)",
    "max_new_tokens": "longest completion",
    "temperature": "sampling temperature of the rollouts (and of the log-probabilities)",
    "clip_eps": "PPO clip range of the policy ratio",
    "kl_coef": "weight of the k3 KL to the frozen starting model (0 = no reference model)",
    "updates_per_batch": "optimizer steps on each batch of rollouts (the ratio is clipped from the second on)",
    "zero_adv_mask": "drop groups whose rewards are all equal from the loss (--no-zero-adv-mask: keep them)",
    "curriculum": "sample prompts whose estimated pass rate is neither 0 nor 1 (--no-curriculum: uniform)",
    "curriculum_pool": "prompts whose pass rate is re-estimated every --curriculum-every steps",
    "curriculum_samples": "samples per prompt for that estimate",
    "curriculum_every": "steps between pass-rate estimates",
    "pass_reward": "the reward that decides pass/fail for the curriculum and the log",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the one beside --init)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# `moge train` flags that post-training does not take (one process, the model comes from --init)
PRETRAINING_ONLY = ("data", "model", "expert_parallel", "dist_timeout", "mtp_modules", "mtp_loss_weight",
                    "eval_every", "eval_windows", "grad_accum")


def register(sub: argparse._SubParsersAction) -> None:
    from moge.train.rl import RLConfig
    from moge.train.sft import SFTConfig

    s = sub.add_parser(
        "sft", help="supervised fine-tuning on chat JSONL: loss on assistant tokens only, packed, mixed by ratio",
        description="Fine-tunes --init on JSONL files of {\"messages\": [{role, content}, ...]} in the release chat "
                    "format. Conversations are packed into rows with attention kept inside each conversation, the "
                    "loss is on the assistant's tokens, and --data FILE:WEIGHT mixes sources by ratio (the paper's "
                    "3:1 reasoning to non-reasoning). Checkpoints every --save-every steps are released-layout "
                    "directories to merge with `moge merge`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--data", dest="sources", action="append", metavar="FILE[:WEIGHT]",
                   help="chat JSONL file and its mixing weight (repeat for several sources)")
    add_train_arguments(s, SFTConfig(init="-"), SFT_HELP, skip=PRETRAINING_ONLY)
    s.set_defaults(func=run_sft)

    r = sub.add_parser(
        "rl", help="GRPO with the zero-advantage mask, pluggable rewards and a pass-rate curriculum",
        description="Group-relative policy optimisation from --init on --prompts: G samples per prompt from the "
                    "project's batched KV-cache generation, group-normalised advantages, a clipped ratio, an "
                    "optional KL to the frozen start. Groups whose rewards are all equal are masked out (on by "
                    "default). Rewards: --reward NAME[=WEIGHT] with NAME one of correct, format, repetition or "
                    "package.module:function (called as fn(completion_text, ids, item) -> float).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(r)
    r.add_argument("--reward", dest="rewards", action="append", metavar="NAME[=WEIGHT]",
                   help="reward function and weight (repeat; default: correct=1 format=0.1 repetition=0.1)")
    add_train_arguments(r, RLConfig(init="-", prompts="-"), RL_HELP,
                        skip=(*PRETRAINING_ONLY, "batch_size", "seq_len"))
    r.set_defaults(func=run_rl)

    t = sub.add_parser("task", help="the verifiable addition task: make its data, measure a checkpoint's accuracy")
    tsub = t.add_subparsers(dest="task_command", metavar="ACTION")
    tsub.required = True
    m = tsub.add_parser("make", help="write SFT, RL and held-out files, and the corpus plus the task's text",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--out", default="data/arith", help="output directory")
    m.add_argument("--corpus", default="data/corpus", help="prepared corpus to extend with the task's text "
                                                           "('' = no pretraining corpus)")
    m.add_argument("--max-digits", type=int, default=3, help="digits per operand, at most")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--pretrain", type=int, default=20000, help="problems in the pretraining text")
    m.add_argument("--sft", type=int, default=6000, help="worked problems for SFT (reasoning)")
    m.add_argument("--plain", type=int, default=2000, help="digit-reversal chats for SFT (non-reasoning)")
    m.add_argument("--rl", type=int, default=2000, help="RL prompts")
    m.add_argument("--heldout", type=int, default=200, help="held-out problems (in no other file)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_task_make)
    e = tsub.add_parser("eval", help="greedy accuracy of a checkpoint on problems (exact answer check)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--ckpt", required=True, help="checkpoint directory")
    e.add_argument("--problems", default="data/arith/heldout.jsonl", help="JSONL of {messages, answer}")
    e.add_argument("--tokenizer", help="tokenizer (default: the one beside --ckpt)")
    e.add_argument("--limit", type=int, default=0, help="first N problems only (0 = all)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_task_eval)


def _fit(trainer, args, cfg, name: str) -> int:
    from moge.errors import ConfigError
    from moge.train.config import TrainingError

    if args.resume:
        if trainer.resume():
            print(f"resumed from step {trainer.step} ({trainer.latest_checkpoint()})", file=sys.stderr)
    elif trainer.latest_checkpoint() is not None:
        raise ConfigError(f"--out={cfg.out} already holds a run; pass --resume to continue it or choose another --out")
    try:
        summary = trainer.fit(progress=not args.no_progress)
    except TrainingError as e:
        print(f"moge {name}: error: {e}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in summary.items() if k != "val"}
    print(json.dumps(summary, indent=2) if args.json else
          f"step {summary['step']}: checkpoint {summary['checkpoint']}")
    return 130 if summary["interrupted"] else 0


def run_sft(args: argparse.Namespace) -> int:
    from moge.train.chat import ChatData, parse_source
    from moge.train.rl import tokenizer_for
    from moge.train.sft import SFTConfig, SFTTrainer

    cfg = train_config_from_args(args, SFTConfig(init="-"))
    sources = []
    for i, s in enumerate(cfg.sources):
        if isinstance(s, str):
            sources.append(list(parse_source(s)))
        elif isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str):
            sources.append([s[0], float(s[1])])
        else:
            from moge.errors import ConfigError

            raise ConfigError(f"sources[{i}]={s!r} is invalid: give \"FILE[:WEIGHT]\" or [FILE, WEIGHT]")
    cfg = dataclasses.replace(cfg, sources=sources)
    if cfg.init == "-":
        from moge.errors import ConfigError

        raise ConfigError("sft needs --init CKPT: the checkpoint to fine-tune")
    data = ChatData([(p, float(w)) for p, w in cfg.sources], tokenizer_for(cfg.init, args.tokenizer),
                    seq_len=cfg.seq_len, seed=cfg.seed)
    return _fit(SFTTrainer(cfg, data, log=lambda m: print(m, file=sys.stderr)), args, cfg, "sft")


def run_rl(args: argparse.Namespace) -> int:
    from moge.errors import ConfigError
    from moge.train.rl import PromptData, RLConfig, RLTrainer, tokenizer_for

    cfg = train_config_from_args(args, RLConfig(init="-", prompts="-"))
    if cfg.init == "-" or cfg.prompts == "-":
        raise ConfigError("rl needs --init CKPT and --prompts FILE")
    data = PromptData(cfg.prompts, tokenizer_for(cfg.init, args.tokenizer))
    return _fit(RLTrainer(cfg, data, log=lambda m: print(m, file=sys.stderr)), args, cfg, "rl")


def run_task_make(args: argparse.Namespace) -> int:
    from moge.train.tasks import make_task

    summary = make_task(args.out, corpus=args.corpus or None, max_digits=args.max_digits, seed=args.seed,
                        pretrain=args.pretrain, sft=args.sft, plain=args.plain, rl=args.rl, heldout=args.heldout)
    print(json.dumps(summary, indent=2) if args.json else f"task data written to {args.out}: {summary}")
    return 0


def run_task_eval(args: argparse.Namespace) -> int:
    import torch

    from moge.checkpoint import load_pretrained
    from moge.train.rl import accuracy, load_prompts, tokenizer_for

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = tokenizer_for(args.ckpt, args.tokenizer)
    items, ids = load_prompts(args.problems, tokenizer)
    if args.limit:
        items, ids = items[:args.limit], ids[:args.limit]
    model = load_pretrained(args.ckpt).eval()
    result = accuracy(model, tokenizer, items, ids, max_new_tokens=args.max_new_tokens)
    result["ckpt"] = str(Path(args.ckpt))
    print(json.dumps(result, indent=2) if args.json else
          f"{result['ckpt']}: accuracy {result['accuracy']:.3f} on {result['problems']} problems "
          f"(well formed {result['well_formed']:.3f})")
    return 0
