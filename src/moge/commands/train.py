"""`moge train`, `moge analyze` and `moge merge`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from moge.errors import ConfigError
from moge.train.config import AUX_SCOPES, TrainConfig

# `moge compare` trains six models per seed: the defaults (one seed) take about 15 minutes on 2 CPU
# cores; the study in docs/compare.md is --seeds 3 --steps 900 --jobs 2 --threads 1.
COMPARE_DEFAULTS = TrainConfig(out="runs/compare", steps=300, eval_every=100, save_every=100)

HELP = {
    "model": "model preset (moge-tiny, topk-tiny, dense-tiny, moge-small, ...) or a config.json path",
    "data": "prepared corpus directory (moge data prepare)",
    "out": "run directory: checkpoints, metrics.jsonl, train_config.json",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch (over all data-parallel ranks under torchrun)",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (after warmup)",
    "min_lr": "final learning rate of the cosine decay",
    "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices (not norms, biases, router_scale, embeddings)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "aux_alpha": "alpha of the auxiliary balance loss (0 = off)",
    "aux_scope": f"balance loss scope: {', '.join(AUX_SCOPES)} (micro-batch global softmax, global batch, "
                 "per-group local softmax)",
    "z_loss": "router z-loss coefficient (0 = off)",
    "bias_update_rate": "aux-loss-free balancing: selection-bias update per step (0 = off)",
    "eval_every": "validate every N steps",
    "eval_windows": "validation windows per domain",
    "save_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept on disk",
    "seed": "seed for initialisation and data order",
    "device": "auto, cpu, cuda or cuda:N (bf16 autocast on cuda; under torchrun auto and cuda mean the local "
              "rank's GPU, with nccl; cpu uses gloo)",
    "threads": "torch CPU threads (0 = torch's default)",
    "init_std": "std of the normal initialisation",
    "mtp_modules": "1 = add a multi-token-prediction module to the model (same as --mtp); 0 = as its config says",
    "expert_parallel": "under torchrun: ranks sharing one copy of the routed experts (must divide the world "
                       "size and the number of expert groups); 1 = data parallel only",
    "dist_timeout": "seconds a collective waits for the other ranks before failing with an error",
    "mtp_loss_weight": "weight of the MTP module's cross-entropy on token t+2 (0 = off; alias --mtp-weight)",
    "init": "start from this checkpoint's weights (released layout) with a fresh optimizer; the model config is "
            "the checkpoint's",
}
# Fields that only a --config file sets (lists and objects): the data mixture and the phases.
CONFIG_ONLY = ("domain_weights", "phases")
# Extra spellings of some flags.
ALIASES = {"mtp_loss_weight": ("--mtp-weight",)}


def add_train_arguments(p: argparse.ArgumentParser, defaults: TrainConfig | None = None,
                        helps: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per scalar field of the config, so the CLI and the config file never drift apart
    (lists and objects come from --config)."""
    defaults = defaults or TrainConfig()
    helps = HELP | (helps or {})
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if f.name in skip or isinstance(value, (list, dict)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{helps.get(f.name, '')} (default: {value})")
            continue
        kind = type(value)
        choices = list(AUX_SCOPES) if f.name == "aux_scope" else None
        p.add_argument(flag, *ALIASES.get(f.name, ()), type=kind, default=None, choices=choices,
                       help=f"{helps.get(f.name, '')} (default: {value})")
    if "mtp_modules" in skip:
        return
    p.add_argument("--mtp", dest="mtp_modules", action="store_const", const=1,
                   help="add one multi-token-prediction module (DeepSeek-V3) to the model; train it with --mtp-weight")


def train_config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    names = {f.name for f in dataclasses.fields(base)}
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except OSError as e:
            raise ConfigError(f"--config {args.config}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {args.config}: malformed JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {args.config}: expected a JSON object of settings")
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"--config {args.config}: unknown keys {sorted(unknown)}; valid keys are the "
                             f"long flags with '_' for '-', and {', '.join(CONFIG_ONLY)}")
        base = dataclasses.replace(base, **data)
    changes = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return dataclasses.replace(base, **changes)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a MoGE / top-K MoE / dense language model on the prepared corpus",
        description="Trains with AdamW, warmup + cosine, clipping, the paper's auxiliary balance loss and "
                    "z-loss. Checkpoints (model in the released safetensors layout + optimizer/RNG state) are "
                    "written atomically; --resume continues exactly where the run stopped. Ctrl-C or SIGTERM "
                    "saves a checkpoint and exits. Under torchrun (`torchrun --nproc-per-node N -m moge train "
                    "...`) every process is a data-parallel rank and --expert-parallel E splits the routed "
                    "experts over E of them; checkpoints load at any expert-parallel size.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of training settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print each rank's memory (weights, gradients, AdamW state, activations of one micro-batch) "
                        "for --world ranks and --expert-parallel, from the model on the meta device: nothing is "
                        "trained, no processes are started")
    p.add_argument("--world", type=int, default=1, help="--dry-run: number of ranks (processes)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    c = sub.add_parser(
        "compare", help="MoGE vs top-K, group-limited and dense over seeds: intervals, paired differences, plots",
        description="Trains every variant (moge, moge-local-aux, topk, topk-aux-free, deepseek, dense: equal "
                    "activated parameters, equal tokens) on --seeds seeds. A seed sets the initialisation and the "
                    "data order; at one seed every variant sees the same batches, so differences are paired per "
                    "seed. Then writes the report (validation loss per domain with mean, std and 95% t-interval, "
                    "paired differences, device balance of the real routing at 16..4096 tokens per batch, a "
                    "dedicated interleaved throughput benchmark, PNG plots in img/ next to it) to --report. Runs "
                    "live in OUT/runs/<variant>/seed-<s>: a re-run reuses finished ones and resumes interrupted "
                    "ones, so the same command regenerates the report. --jobs 2 --threads 1 trains two runs at "
                    "once.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--config", help="JSON file of training settings (flags override it)")
    c.add_argument("--seeds", type=int, default=1, help="number of seeds: --seed, --seed + 1, ... (default 1)")
    c.add_argument("--variants", nargs="+", metavar="NAME",
                   help="train and report only these variants (default: all six)")
    c.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    c.add_argument("--report", help="where to write the markdown report (default OUT/report.md); plots go to "
                                    "img/ next to it")
    c.add_argument("--throughput-rounds", type=int, default=5,
                   help="rounds of the interleaved throughput benchmark after training (0 = skip it)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    # each variant sets its own model; the study runs in one process per run, not under torchrun
    add_train_arguments(c, COMPARE_DEFAULTS, skip=("model", "init", "expert_parallel", "dist_timeout"))
    c.set_defaults(func=run_compare_cmd)

    a = sub.add_parser(
        "analyze", help="the paper's routing analyses on a trained checkpoint (PNG + JSON)",
        description="Per-domain expert share at the first, middle and last layer, co-activation of expert "
                    "pairs, each expert's share of its group, global per-expert share, and device imbalance "
                    "on real routing for batch sizes 16..4096, over the validation split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--ckpt", required=True, help="checkpoint directory (released layout)")
    a.add_argument("--data", default="data/corpus", help="prepared corpus directory")
    a.add_argument("--out", default=None, help="output directory (default: CKPT/analysis)")
    a.add_argument("--windows", type=int, default=64, help="validation windows per domain")
    a.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.set_defaults(func=run_analyze)

    m = sub.add_parser(
        "merge", help="merge checkpoints: base + sum_k lambda_k * mean_i(ckpt_k_i - base)",
        description="The paper's checkpoint merging. Each --group takes comma-separated checkpoint "
                    "directories (e.g. one epoch's checkpoints) and is weighted by the matching --lam.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--base", required=True, help="base checkpoint directory")
    m.add_argument("--group", action="append", required=True, help="comma-separated checkpoint directories")
    m.add_argument("--lam", action="append", type=float, required=True, help="lambda of the matching --group")
    m.add_argument("--out", required=True, help="output checkpoint directory")
    m.add_argument("--json", action="store_true", help="print a JSON summary")
    m.set_defaults(func=run_merge)


def run_train(args: argparse.Namespace) -> int:
    """Single process, or one rank of `torchrun --nproc-per-node N -m moge train ...` (data x expert
    parallel; only rank 0 prints and writes)."""
    from moge.parallel.launch import (
        DistributedError,
        init_distributed,
        launched_by_torchrun,
        peer_failures_as_errors,
        resolve_device,
        shutdown,
    )

    cfg = train_config_from_args(args)
    if args.dry_run:
        return _dry_run(args, cfg)
    device = resolve_device(cfg.device)  # a device that does not exist fails here, before any process group
    distributed = launched_by_torchrun()
    rank = init_distributed(cfg.dist_timeout, device=device)[0] if distributed else 0
    try:
        with peer_failures_as_errors(cfg.dist_timeout):
            return _train(args, cfg, rank)
    except DistributedError as e:
        print(f"moge train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            shutdown()


def _dry_run(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Per-rank memory of the run from the sharding code itself (moge.train.dryrun). The vocabulary is
    the corpus's when --data holds one, otherwise the model config's."""
    from moge.config import load_model_config
    from moge.errors import MissingFileError, bad_value
    from moge.train.data import load_data
    from moge.train.dryrun import ACTIVATIONS_COUNTED, train_dry_run
    from moge.train.model import model_config_for

    if args.world < 1:
        raise bad_value("world", args.world, "must be a positive integer")
    try:
        data = load_data(cfg)
        model_cfg, vocab = model_config_for(cfg, data.vocab_size, data.eos_id, data.pad_id), f"corpus {cfg.data}"
    except MissingFileError:
        model_cfg, vocab = load_model_config(cfg.model), "model config (no corpus at --data)"
    ranks = train_dry_run(cfg, model_cfg, args.world)
    out = {"model": cfg.model, "world": args.world, "expert_parallel": cfg.expert_parallel,
           "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "vocab_size": model_cfg.vocab_size,
           "vocab_from": vocab, "dtype": "float32", "ranks": [r.as_dict() for r in ranks],
           "activations": ACTIVATIONS_COUNTED}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{cfg.model} trained on {args.world} ranks, expert parallel {cfg.expert_parallel}, fp32, micro-batch "
          f"{cfg.batch_size} x {cfg.seq_len} tokens over all ranks (vocabulary {model_cfg.vocab_size}, from the "
          f"{vocab}):")
    for r in ranks:
        print(f"  rank {r.rank}: weights {r.weights_bytes / 1e9:.3f} GB (experts {r.expert_weights_bytes / 1e9:.3f}), "
              f"gradients {r.gradient_bytes / 1e9:.3f} GB, AdamW {r.optimizer_bytes / 1e9:.3f} GB, activations "
              f"~{r.activation_bytes / 1e9:.3f} GB, total {r.total_bytes / 1e9:.3f} GB")
    print(f"activations: {ACTIVATIONS_COUNTED}")
    return 0


def _train(args: argparse.Namespace, cfg: TrainConfig, rank: int) -> int:
    from moge.train.config import TrainingError
    from moge.train.data import load_data
    from moge.train.trainer import Trainer

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr)

    data = load_data(cfg)
    trainer = Trainer(cfg, data, log=say)
    if args.resume:
        if trainer.resume():
            say(f"resumed from step {trainer.step} ({trainer.latest_checkpoint()})")
        else:
            say(f"no checkpoint in {cfg.out}; starting from scratch")
    elif trainer.latest_checkpoint() is not None:
        raise ConfigError(f"--out={cfg.out} already holds a run; pass --resume to continue it or choose another --out")
    try:
        summary = trainer.fit(progress=not args.no_progress)
    except TrainingError as e:
        print(f"moge train: error: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            val = ", ".join(f"{d} {v:.3f}" for d, v in summary["val"].items())
            print(f"step {summary['step']}: validation loss {val}; checkpoint {summary['checkpoint']}")
    return 130 if summary["interrupted"] else 0


def run_compare_cmd(args: argparse.Namespace) -> int:
    from moge.train.compare import run_study, select_variants, throughput_cached
    from moge.train.compare_report import write_report

    cfg = train_config_from_args(args, COMPARE_DEFAULTS)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is invalid: must be >= 1")
    variants = select_variants(args.variants)
    seeds = list(range(cfg.seed, cfg.seed + args.seeds))
    out = Path(cfg.out)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        results = run_study(cfg, out, seeds, variants, jobs=args.jobs, progress=not args.no_progress, log=log)
    except KeyboardInterrupt:
        print(f"moge compare: interrupted; finished and partial runs are kept in {out / 'runs'}, run the same "
              f"command again to continue", file=sys.stderr)
        return 130
    throughput = throughput_cached(out, cfg, variants, args.throughput_rounds, steps=3,
                                   threads=cfg.threads or 1, log=log)
    report = Path(args.report) if args.report else out / "report.md"
    write_report(results, variants, seeds, cfg, report, throughput=throughput,
                 command=_compare_command(args, cfg, report))
    if args.json:
        print(json.dumps({"report": str(report), "throughput": throughput,
                          "runs": [results[(v.name, s)] | {"variant": v.name, "seed": s}
                                   for s in seeds for v in variants]}, indent=2))
    else:
        print(report.read_text())
    return 0


def _compare_command(args: argparse.Namespace, cfg: TrainConfig, report: Path) -> str:
    """The command that regenerates this report: every setting that differs from the defaults."""
    import shlex

    parts = ["moge", "compare"]
    if args.seeds != 1:
        parts += ["--seeds", str(args.seeds)]
    if args.variants:
        parts += ["--variants", *args.variants]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in CONFIG_ONLY and value != getattr(COMPARE_DEFAULTS, f.name):
            parts += ["--" + f.name.replace("_", "-"), str(value)]
    if args.report:
        parts += ["--report", str(report)]
    if args.throughput_rounds != 5:
        parts += ["--throughput-rounds", str(args.throughput_rounds)]
    return " ".join(shlex.quote(p) for p in parts)


def run_analyze(args: argparse.Namespace) -> int:
    from moge.train.analysis import analyze, collect_routing, plot_analysis, write_report
    from moge.checkpoint import load_pretrained
    from moge.data.tokenizer_check import check_corpus_tokenizer
    from moge.train.trainer import TrainData

    model = load_pretrained(args.ckpt)
    check_corpus_tokenizer(args.data, args.ckpt)
    data = TrainData(args.data, seq_len=args.seq_len)
    batches = {d: [b[:, :-1] for b in data.val_batches(d, args.windows, 16)] for d in data.domains}
    stats = analyze(collect_routing(model, batches))
    out = Path(args.out) if args.out else Path(args.ckpt) / "analysis"
    paths = plot_analysis(stats, out, title=Path(args.ckpt).name)
    report = write_report(stats, out)
    summary = {"json": str(report), "plots": [str(p) for p in paths],
               "layers": [{k: e[k] for k in ("layer", "intra_group_share_max", "intra_group_share_min",
                                               "coactivation_same_group_pairs", "coactivation_cross_group_pairs")}
                          | {"max_expert_share": e["experts"]["max_share"]} for e in stats["layers"]]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for e in summary["layers"]:
            print(f"layer {e['layer']}: busiest expert {e['max_expert_share']:.1%} of tokens, in-group share "
                  f"{e['intra_group_share_min']:.1%}..{e['intra_group_share_max']:.1%}, same-group co-activations "
                  f"{e['coactivation_same_group_pairs']}, cross-group {e['coactivation_cross_group_pairs']}")
        print(f"wrote {report} and {len(paths)} plots to {out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from moge.checkpoint.merge import merge_checkpoints

    if len(args.group) != len(args.lam):
        raise ConfigError(f"got {len(args.group)} --group but {len(args.lam)} --lam: give one --lam per --group")
    groups = [[p for p in g.split(",") if p] for g in args.group]
    merge_checkpoints(args.base, groups, args.lam, args.out)
    summary = {"out": args.out, "base": args.base, "groups": groups, "lambdas": args.lam}
    print(json.dumps(summary, indent=2) if args.json else f"merged checkpoint written to {args.out}")
    return 0
