"""`moge params` and `moge generate`: the Pangu Pro MoE model from the command line."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moge.errors import ConfigError, DistributedError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params", help="total and activated parameter counts of a preset or config.json",
        description="Builds the model on the meta device (no memory is allocated) and counts its "
                    "parameters. Activated = what one token uses: the K routed experts, the shared "
                    "expert, everything dense and both embedding matrices (the paper's convention).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default="pangu-pro-moe",
                   help="preset name, config.json path or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run_params)

    g = sub.add_parser(
        "generate", help="generate text from a checkpoint in the released layout",
        description="Loads a checkpoint directory (config.json, *.safetensors, tokenizer) and "
                    "generates a continuation for each --prompt, printing the text and tokens/s. "
                    "Several --prompt flags run as one padded batch. Under torchrun "
                    "(`torchrun --nproc-per-node N -m moge generate ...`) the model is split over the N "
                    "processes: routed experts over all of them (--parallel ep), or the paper's H2P layout "
                    "(--parallel h2p: attention DP x TP, experts TP x EP, shared expert TP); every rank runs "
                    "the same prompts and rank 0 prints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", required=True, help="checkpoint directory in the released layout")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--token-ids", action="append",
                   help="a prompt as comma-separated token ids instead of text (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the release's chat format")
    g.add_argument("--system", default="", help="system message for --chat")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same sample)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype the weights are loaded in (default: the checkpoint's, config.json torch_dtype)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N; auto = the GPU (under torchrun: the local rank's) when CUDA is "
                        "present, else cpu")
    g.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads; auto (default) times decode steps at 1, 2, 4, ... threads up to the "
                        "usable cores, runs the fastest and re-checks as the machine's load changes")
    g.add_argument("--compile", action="store_true",
                   help="decode with one torch.compile'd step on a static KV cache (CUDA graphs on a GPU with "
                        "bf16 weights): faster per token, after a one-off compile of seconds; pays for long "
                        "generations (single process; not with --speculative)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    g.add_argument("--speculative", action="store_true",
                   help="speculative decoding with the checkpoint's MTP module (same output / distribution; "
                        "prints the draft acceptance rate)")
    g.add_argument("--num-draft", type=int, default=1,
                   help="draft tokens per step with --speculative (more than 1 chains the MTP module)")
    g.add_argument("--parallel", choices=["ep", "h2p"], default="ep",
                   help="under torchrun: experts split over all ranks, or the H2P hybrid layout")
    g.add_argument("--attn-tp", type=int, default=1, help="--parallel h2p: attention tensor-parallel size")
    g.add_argument("--expert-tp", type=int, default=1, help="--parallel h2p: routed-expert tensor-parallel size")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun: seconds a collective waits for the other ranks before failing")
    g.add_argument("--dry-run", action="store_true",
                   help="print each rank's memory (weights, KV cache, activations) under --parallel for --world "
                        "ranks without loading anything or starting processes (--model may be a preset)")
    g.add_argument("--world", type=int, default=1, help="--dry-run: number of ranks")
    g.add_argument("--batch", type=int, default=1, help="--dry-run: sequences served at once, over all ranks")
    g.add_argument("--context", type=int, default=2048, help="--dry-run: KV-cache tokens per sequence")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    g.set_defaults(func=run_generate)


def run_params(args: argparse.Namespace) -> int:
    from moge.config import load_model_config
    from moge.nn.model import PanguProMoEForCausalLM

    cfg = load_model_config(args.model)
    with torch.device("meta"):
        model = PanguProMoEForCausalLM(cfg)
    counts = model.num_parameters()
    result = {"model": str(args.model), **counts, "total_billions": counts["total"] / 1e9,
              "activated_billions": counts["activated"] / 1e9,
              "bf16_weight_gib": counts["total"] * 2 / 2**30}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: total {counts['total']:,} ({result['total_billions']:.2f}B), "
              f"activated {counts['activated']:,} ({result['activated_billions']:.2f}B), "
              f"bf16 weights {result['bf16_weight_gib']:.1f} GiB")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun job (see the subcommand's description)."""
    from moge.parallel.launch import (init_distributed, launched_by_torchrun, peer_failures_as_errors,
                                      resolve_device, shutdown)

    if args.dry_run:
        return _dry_run(args)
    if not launched_by_torchrun():
        return _generate(args, None)
    init_distributed(args.dist_timeout, device=resolve_device(args.device))
    try:
        with peer_failures_as_errors(args.dist_timeout):
            return _generate(args, args.parallel)
    except DistributedError as e:
        print(f"moge generate: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()


def _dry_run(args: argparse.Namespace) -> int:
    """Per-rank memory from the sharding code itself, on the meta device (moge.parallel.dryrun)."""
    from pathlib import Path

    from moge.checkpoint.build import checkpoint_dtype, resolve_dtype
    from moge.config import load_model_config
    from moge.errors import bad_value
    from moge.parallel.dryrun import dry_run

    for name in ("world", "batch", "context"):
        if getattr(args, name) < 1:
            raise bad_value(name, getattr(args, name), "must be a positive integer")
    cfg = load_model_config(args.model)
    is_dir = Path(args.model).is_dir()
    dtype = resolve_dtype(args.dtype) if args.dtype else (checkpoint_dtype(args.model) if is_dir else None)
    dtype = dtype or torch.bfloat16  # the release's dtype
    plan = _plan(args.parallel, args, args.world)
    ranks = dry_run(cfg, plan, args.world, dtype=dtype, batch=args.batch, context=args.context)
    out = {"model": str(args.model), "plan": repr(plan), "world": args.world,
           "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "context": args.context,
           "ranks": [r.as_dict() for r in ranks],
           "activations": "one decoder layer's largest live tensors in a prefill of the whole context, plus the "
                          "last position's fp32 logits (an estimate; weights and KV cache are exact)"}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model} under {plan!r} on {args.world} ranks, {out['dtype']}, batch {args.batch}, "
          f"context {args.context}:")
    for r in ranks:
        print(f"  rank {r.rank}: weights {r.weights_bytes / 1e9:.3f} GB, KV cache {r.kv_cache_bytes / 1e9:.3f} GB "
              f"({r.sequences} sequences), activations ~{r.activation_bytes / 1e9:.3f} GB, "
              f"total {r.total_bytes / 1e9:.3f} GB")
    return 0


def _plan(parallel: str, args: argparse.Namespace, world: int):
    from moge.parallel import H2P, ExpertParallel

    return H2P(args.attn_tp, args.expert_tp) if parallel == "h2p" else ExpertParallel(world)


def _load(args: argparse.Namespace, parallel: str | None):
    """The model, or under torchrun this rank's share of it, read rank by rank from the safetensors
    files (float or W8A8): each rank reads only what it hosts."""
    from moge.checkpoint import load_pretrained

    placement = _placement(args)
    if parallel is None:
        return load_pretrained(args.model, **placement).eval()
    import torch.distributed as dist

    from moge.parallel import load_parallel

    plan = _plan(parallel, args, dist.get_world_size())
    return load_parallel(args.model, plan, **placement).eval()


def _placement(args: argparse.Namespace) -> dict:
    """Device and dtype to load in: --device (checked to exist), --dtype or the checkpoint's own
    (config.json torch_dtype), refused where the device cannot run it, with a warning on stderr where
    it runs slowly there."""
    import torch.distributed as dist

    from moge.checkpoint.build import checkpoint_dtype, resolve_dtype
    from moge.parallel.launch import check_dtype_on_device, resolve_device, slow_dtype_note

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) if args.dtype else checkpoint_dtype(args.model)
    if dtype is not None:
        check_dtype_on_device(dtype, device)
        note = slow_dtype_note(dtype, device)
        if note and not (dist.is_initialized() and dist.get_rank() != 0):  # one warning per job
            print(f"moge {getattr(args, 'command', None) or 'generate'}: warning: {note}", file=sys.stderr)
    return {"dtype": dtype, "device": device}


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads {value!r} is invalid: a positive integer or 'auto'")
    return n


def _generate(args: argparse.Namespace, parallel: str | None) -> int:
    from moge.inference.generate import Sampling, generate
    from moge.inference.tokenizer import chat_prompt, load_tokenizer

    from moge.inference.threads import decode_threads

    runner = decode_threads(args.threads)
    if args.compile and (parallel is not None or args.speculative):
        raise ConfigError("--compile runs plain single-process decoding: drop it for torchrun or --speculative")
    if not args.prompt and not args.token_ids:
        raise ConfigError("give at least one --prompt TEXT or --token-ids 1,2,3")
    model = _load(args, parallel)
    tok = None
    prompts: list[list[int]] = []
    stop = [model.config.eos_token_id]
    if args.prompt:
        tok = load_tokenizer(args.model)
        for text in args.prompt:
            if args.chat:
                text, stop_id = chat_prompt([("system", args.system), ("user", text)], tok)
                stop = [stop_id]
            prompts.append(tok.encode(text, add_bos=tok.bos_id is not None))
    for ids in args.token_ids or []:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            raise ConfigError(f"--token-ids={ids!r} is invalid: expected comma-separated integers") from None
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    quiet, all_done, agree_min = False, None, None
    if parallel is not None:
        import torch.distributed as dist

        from moge.parallel.lockstep import all_ranks_done, min_over_ranks

        quiet = dist.get_rank() != 0  # every rank decodes the same prompts; rank 0 reports
        all_done, agree_min = all_ranks_done, min_over_ranks
    on_token = None
    if args.stream and not args.json and tok is not None and len(prompts) == 1 and not quiet:
        def on_token(row: int, token: int) -> None:
            sys.stdout.write(tok.decode([token]))
            sys.stdout.flush()
    if args.speculative:
        from moge.inference.speculative import speculative_generate

        res = speculative_generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                   stop_ids=stop, on_token=on_token, num_draft=args.num_draft, all_done=all_done,
                                   agree_min=agree_min)
    else:
        res = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stop,
                       on_token=on_token, all_done=all_done, compile=args.compile,
                       threads=runner if next(model.parameters()).device.type == "cpu" else None)
    if quiet:
        return 0
    texts = [tok.decode(t) if tok is not None else None for t in res.tokens]
    out = {"completions": [{"tokens": t, "text": x} for t, x in zip(res.tokens, texts)],
           "prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens,
           "prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
           "threads": res.threads}
    if args.speculative:
        rate, per_step = res.acceptance_rate, res.tokens_per_step  # nan (nothing drafted) -> null
        out["speculative"] = {"num_draft": res.num_draft, "acceptance_rate": rate if rate == rate else None,
                              "drafted": res.drafted, "accepted": res.accepted,
                              "tokens_per_step": per_step if per_step == per_step else None,
                              "verify_steps": res.decode_steps}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if on_token is not None:
        print()
    else:
        for i, c in enumerate(out["completions"]):
            print(f"[{i}] {c['text'] if c['text'] is not None else c['tokens']}")
    print(f"prefill {res.prompt_tokens} tokens at {res.prefill_tokens_per_s:.1f} tok/s; "
          f"decode {res.new_tokens} tokens at {res.decode_tokens_per_s:.1f} tok/s", file=sys.stderr)
    if args.speculative and res.drafted:
        print(f"speculative: {res.accepted}/{res.drafted} drafts accepted ({100 * res.acceptance_rate:.1f}%), "
              f"{res.tokens_per_step:.2f} tokens per verify step", file=sys.stderr)
    return 0
