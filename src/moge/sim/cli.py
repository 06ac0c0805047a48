"""`moge simulate` and `moge search`: the deployment simulator and its searches on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from moge.config import load_model_config
from moge.errors import ConfigError
from moge.sim.hardware import list_hardware, load_hardware
from moge.sim.plans import DISPATCH_CHOICES, PLAN_PRESETS, InfeasiblePlan, plan_preset
from moge.sim.quant import KV_CACHE_CHOICES, QUANT_CHOICES
from moge.sim.simulate import STAGES, Scenario, simulate
from moge.sim.straggler import ROUTING_HELP

SIM_DESCRIPTION = """\
Predict how fast a dense, top-K MoE or MoGE model serves on given hardware with a given parallel
plan: TTFT, TPOT, throughput per card, memory per card and where the time goes, operator by
operator, on the busiest device. Each stream has its own efficiency: GEMMs are rooflines of the
compute ceiling and weight streaming (with DRAM re-reads of tiles that do not fit on chip),
routed experts are grouped GEMMs padded per expert, attention reads the KV cache at its own
efficiency plus a cost per sequence, collectives are alpha-beta costs per interconnect level, and
every kernel has a fixed device cost (and a host cost in eager mode). Three factors are fitted,
one per paper point (Ascend 800I A2); every other number is a prior with a source and a range,
which --uncertainty propagates to p10/p50/p90.
See docs/simulator.md for the equations, assumptions and known blind spots.

example (the paper's decode setting):
  moge simulate --model pangu-pro-moe --hardware ascend-800i-a2 --cards 4 --stage decode \\
      --batch 456 --input-len 2048 --quant w8a8 --json
"""

SEARCH_DESCRIPTION = """\
(a) default: for a model, hardware and card count, try every valid parallel plan (attention
DP x TP, routed experts TP x EP, shared-expert / MLP TP, dispatch, all-reduce or the RS+AG
rewrite, optional pipeline stages), find each plan's largest batch that fits in memory and meets
the TPOT (decode) or TTFT (prefill) bound, and rank by throughput per card.
(b) --arch: the paper's architecture search over MoGE shapes with 60-80B total parameters
(hidden 4096-8192, 32-64 query heads, 8-16 KV heads, 40-64 layers, 32-64 experts, K=8 over 8
groups), scored by decode throughput per card under TPOT 100 ms on Atlas 300I Duo and 50 ms on
Ascend 800I A2; prints Pangu Pro MoE's rank and writes a Fig. 3-like scatter with --plot.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the descriptions' line breaks and show every option's default."""


def _common(p: argparse.ArgumentParser, search: bool = False) -> None:
    p.add_argument("--model", default="pangu-pro-moe",
                   help="preset name (pangu-pro-moe, qwen2.5-32b, qwen2.5-72b, ...) or a Hugging Face style "
                        "config.json / checkpoint directory")
    p.add_argument("--hardware", default="ascend-800i-a2",
                   help=f"profile name ({', '.join(list_hardware())}) or a path to your own profile JSON")
    p.add_argument("--cards", type=int, default=4 if not search else 8,
                   help="cards (an Atlas 300I Duo card holds 2 devices; other profiles 1)")
    p.add_argument("--stage", choices=STAGES, default="decode", help="which stage to report / optimise")
    p.add_argument("--input-len", type=int, default=2048, help="prompt tokens per sequence")
    p.add_argument("--output-len", type=int, default=0,
                   help="generated tokens per sequence: decode runs at KV length input+output/2 and memory "
                        "holds input+output")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="w8a8", help="weight/activation quantization")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto",
                   help="KV-cache dtype (auto: int8 under w8a8/w4a8, else 16 bit)")
    p.add_argument("--routing", default="auto", help=f"routing model for the straggler Monte Carlo: {ROUTING_HELP}")
    p.add_argument("--mtp-draft", type=int, default=None,
                   help="MTP draft tokens per step (speculative decoding; default 0, or 1 if --mtp-acceptance "
                        "is given)")
    p.add_argument("--mtp-acceptance", type=float, default=0.0,
                   help="probability that each draft token is accepted (tokens per step = 1 + a + a^2 + ...)")
    p.add_argument("--mtp-accepted", type=float, default=None,
                   help="mean accepted draft tokens per step, as serving logs report it: TPOT = step / (1 + "
                        "accepted); overrides --mtp-acceptance (default draft count 1, or ceil(accepted))")
    p.add_argument("--voted-experts", type=int, default=None,
                   help="experts kept per group per batch (the release's Atlas 300I Duo rule, 5 of 8): the busiest "
                        "device reads at most this many experts per local group")
    p.add_argument("--overlap-comm", action="store_true",
                   help="hide a share (the profile's comm_overlap) of the shorter of communication and compute")
    p.add_argument("--exec-mode", choices=("graph", "eager"), default="graph",
                   help="graph: the step is device time; eager: max(host launch time, device time)")
    p.add_argument("--uncertainty", action="store_true",
                   help="propagate every prior's range (Monte Carlo, refitting the calibrated factors per sample) "
                        "and print p10/p50/p90 of TTFT, TPOT and throughput and the three most influential inputs "
                        "(search --arch: Pangu Pro MoE's rank per draw)")
    p.add_argument("--samples", type=int, default=200 if not search else 20,
                   help="Monte Carlo samples for --uncertainty (search --arch: one full search per sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --uncertainty")
    p.add_argument("--tpot-bound-ms", type=float, default=None, help="latency bound on TPOT (decode)")
    p.add_argument("--ttft-bound-ms", type=float, default=None, help="latency bound on TTFT (prefill)")
    p.add_argument("--calibration", metavar="FILE.json", default=None,
                   help="read the efficiency factors from this calibration file instead of the shipped one")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel plan (a preset, then optional per-module overrides)")
    g.add_argument("--plan", choices=PLAN_PRESETS, default="h2p",
                   help="h2p: the paper's hybrid (attention DPxTP, experts TPxEP, shared TP over the stage, "
                        "RS+AG rewrite); tp: all tensor parallel; tp-ep: attention TP, experts EP; "
                        "ep: attention DP, experts EP via all-to-all; dp: one device per replica")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages")
    for name, what in (("attn-tp", "attention tensor parallel"), ("attn-dp", "attention data parallel"),
                       ("expert-tp", "routed-expert tensor parallel"), ("expert-ep", "expert parallel"),
                       ("dense-tp", "shared expert (or dense MLP) tensor parallel")):
        g.add_argument(f"--{name}", type=int, default=None,
                       help=f"override: {what} degree (its partner follows from the stage size unless given)")
    g.add_argument("--dispatch", choices=DISPATCH_CHOICES, default=None,
                   help="override: token exchange for routed experts (allgather = H2P, alltoall = classic EP)")
    g.add_argument("--comm-rewrite", choices=("on", "off"), default=None,
                   help="override: reduce-scatter + all-gather after RMSNorm instead of all-reduce")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="predict TTFT, TPOT, throughput and memory of an MoE/MoGE deployment",
                       description=SIM_DESCRIPTION, formatter_class=_HelpFormatter)
    _common(p)
    _plan_args(p)
    p.add_argument("--batch", type=int, default=None,
                   help="sequences served together (default 1, or the largest that meets the latency bound)")
    p.add_argument("--sweep-batch", metavar="B1,B2,...", default=None,
                   help="simulate each batch size and print a TPOT/throughput table (with --plot: a curve)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="write a per-operator breakdown chart")
    p.add_argument("--validate", action="store_true",
                   help="print the fitted values against the three calibration points (and the leave-one-out "
                        "predictions) and exit")
    p.add_argument("--calibrate", action="store_true",
                   help="refit the efficiency factors on the three calibration points, print them and exit")
    p.add_argument("--calibration-out", metavar="FILE.json", default=None,
                   help="with --calibrate: write the refitted factors to this calibration file")
    p.add_argument("--list-hardware", action="store_true", help="list the shipped hardware profiles and exit")
    p.set_defaults(func=run_simulate)

    s = sub.add_parser("search", help="best plan and batch under a latency bound, or the paper's architecture search",
                       description=SEARCH_DESCRIPTION, formatter_class=_HelpFormatter)
    _common(s, search=True)
    s.add_argument("--max-pp", type=int, default=1, help="(a) largest pipeline depth to try")
    s.add_argument("--plans", default="all",
                   help=f"(a) 'all' valid plans or a comma list of presets ({', '.join(PLAN_PRESETS)})")
    s.add_argument("--top", type=int, default=10, help="(a) rows to print")
    s.add_argument("--arch", action="store_true", help="run the architecture search (b) instead")
    s.add_argument("--targets", default=None,
                   help="(b) comma list of HARDWARE:CARDS:TPOT_MS (default atlas-300i-duo:4:100,ascend-800i-a2:8:50)")
    s.add_argument("--grid", choices=("small", "default"), default="default",
                   help="(b) candidate grid (small: 51 shapes, a few seconds; default: 389 shapes, ~25 s)")
    s.add_argument("--plot", metavar="FILE.png", default=None, help="(b) write the scatter plot")
    s.set_defaults(func=run_search)


# ---------------------------------------------------------------------------------------------


def _model(args):
    model = load_model_config(args.model)
    path = Path(args.model)
    if not path.exists():
        return model, args.model
    if path.is_file() and path.stem == "config":
        path = path.resolve().parent  # a checkpoint's config.json: name it after the directory
    return model, path.stem


def _mtp(args) -> tuple[int, float]:
    if args.mtp_draft is not None:
        draft = args.mtp_draft
    elif args.mtp_accepted is not None:
        draft = max(1, math.ceil(args.mtp_accepted))
    else:
        draft = 1 if args.mtp_acceptance > 0 else 0
    return draft, args.mtp_acceptance


def _plan(args, model, devices):
    plan = plan_preset(args.plan, model, devices, pp=args.pp)
    over = {}
    for f in ("attn_tp", "attn_dp", "expert_tp", "expert_ep", "dense_tp"):
        v = getattr(args, f)
        if v is not None:
            over[f] = v
    stage = max(1, devices // args.pp)
    # Give one side of a pair and the other follows from the stage size.
    for a, b in (("attn_tp", "attn_dp"), ("expert_tp", "expert_ep")):
        if a in over and b not in over:
            over[b] = max(1, stage // over[a])
        elif b in over and a not in over:
            over[a] = max(1, stage // over[b])
    if args.dispatch is not None:
        over["dispatch"] = args.dispatch
    if args.comm_rewrite is not None:
        over["comm_rewrite"] = args.comm_rewrite == "on"
    if over:
        plan = dataclasses.replace(plan, name="custom", **over)
    plan.validate(model, devices)
    return plan


def _scenario(args, batch: int, model, name, hw, plan) -> Scenario:
    draft, acc = _mtp(args)
    return Scenario(model, hw, cards=args.cards, stage=args.stage, batch=batch, input_len=args.input_len,
                    output_len=args.output_len, quant=args.quant, kv_cache=args.kv_cache, plan=plan,
                    routing=args.routing, mtp_draft=draft, mtp_acceptance=acc, model_name=name,
                    tpot_bound_ms=args.tpot_bound_ms, ttft_bound_ms=args.ttft_bound_ms, **_features(args))


def _features(args) -> dict:
    """The deployment features that are Scenario fields (MTP draft/acceptance aside)."""
    return {"mtp_accepted": args.mtp_accepted, "voted_experts": args.voted_experts,
            "overlap_comm": args.overlap_comm, "exec_mode": args.exec_mode}


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run_simulate(args: argparse.Namespace) -> int:
    if args.list_hardware:
        rows = [load_hardware(n, args.calibration).summary() for n in list_hardware()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['name']:<18} {r['peak_tflops']}  {r['memory_gib']} GiB  {r['memory_bandwidth_GBps']} GB/s  "
                      f"links: {', '.join(l['name'] + ' ' + str(l['bandwidth_GBps']) + ' GB/s' for l in r['links'])}")  # noqa: E741
        return 0
    if args.calibrate:
        return _run_calibrate(args)
    if args.validate:
        return _run_validate(args)
    if args.cards is None or args.cards <= 0:
        raise ConfigError(f"--cards={args.cards} is invalid: must be a positive integer")
    model, name = _model(args)
    hw = load_hardware(args.hardware, args.calibration)
    plan = _plan(args, model, args.cards * hw.devices_per_card)
    if args.sweep_batch:
        return _run_sweep(args, model, name, hw, plan)
    bound = args.ttft_bound_ms if args.stage == "prefill" else args.tpot_bound_ms
    if args.batch is None and bound is not None:
        from moge.sim.search import best_batch

        choice = best_batch(lambda b: _scenario(args, b, model, name, hw, plan), bound)
        if choice.result is None:
            raise InfeasiblePlan(f"no batch meets the bound with plan {plan.describe(model)}: {choice.note}")
        result = choice.result
    else:
        result = simulate(_scenario(args, args.batch or 1, model, name, hw, plan))
    if args.plot:
        from moge.sim.report import plot_breakdown

        plot_breakdown(result, args.plot)
    unc = None
    if args.uncertainty:
        from moge.sim.uncertainty import propagate

        batch = result.scenario.batch
        unc = propagate(lambda h: _scenario(args, batch, model, name, h, plan), hw, samples=args.samples,
                        seed=args.seed, calibration=args.calibration).as_dict()
    if args.json:
        out = result.as_dict()
        if args.plot:
            out["plot"] = args.plot
        if unc is not None:
            out["uncertainty"] = unc
        _print_json(out)
    else:
        from moge.sim.report import format_result, format_uncertainty

        print(format_result(result))
        if unc is not None:
            print("\n" + format_uncertainty(unc))
        if args.plot:
            print(f"\nbreakdown chart written to {args.plot}")
    return 0


def _run_sweep(args, model, name, hw, plan) -> int:
    try:
        batches = [int(x) for x in args.sweep_batch.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sweep-batch={args.sweep_batch!r} is invalid: give comma-separated integers") from None
    rows = []
    for b in batches:
        r = simulate(_scenario(args, b, model, name, hw, plan))
        rows.append({"batch": b, "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms,
                     "throughput_tok_s_per_card": r.throughput_tok_s_per_card,
                     "memory_gb_per_card": r.memory_gb_per_card, "breakdown_groups": r.breakdown_groups_ms()})
    if args.plot:
        from moge.sim.report import plot_curve

        key = "ttft_ms" if args.stage == "prefill" else "tpot_ms"
        plot_curve([r["batch"] for r in rows], [r[key] for r in rows], args.plot, "batch", key,
                   f"{name} on {args.cards}x {hw.name}, {args.stage}")
    if args.json:
        _print_json({"plan": plan.describe(model), "rows": rows})
    else:
        print(f"{name} on {args.cards} x {hw.name}, {args.stage}, {plan.describe(model)}")
        print(f"{'batch':>7}{'TTFT ms':>11}{'TPOT ms':>11}{'tok/s/card':>12}{'GB/card':>9}")
        for r in rows:
            print(f"{r['batch']:>7}{r['ttft_ms']:>11.2f}{r['tpot_ms']:>11.2f}{r['throughput_tok_s_per_card']:>12.1f}"
                  f"{r['memory_gb_per_card']:>9.1f}")
    return 0


def _run_validate(args) -> int:
    from moge.sim import calibration as cal
    from moge.sim.hardware import fitted_from_set

    fitted = fitted_from_set(cal.SET_NAME, args.calibration)
    rows = cal.validate(fitted)
    stored = cal.stored_record(args.calibration)
    loo = stored.get("leave_one_out", [])
    if args.json:
        _print_json({"factors": fitted, "settings": cal.SETTINGS, "points": rows, "leave_one_out": loo,
                     "leave_one_out_all_free": stored.get("leave_one_out_all_free", [])})
        return 0
    print(f"calibration set {cal.SET_NAME}: compute {fitted['compute']:.4f}, kv_attention "
          f"{fitted['kv_attention']:.4f}, kernel_us {fitted['kernel_us']:.3f} (weight_stream prior "
          f"{fitted['weight_stream_ref']:.2f})")
    print(f"settings: {cal.SETTINGS}")
    print(f"{'point':<36}{'pins':>14}{'given':>10}{'fitted':>11}{'error':>9}")
    for r in rows:
        print(f"{r['point']:<36}{r['pins']:>14}{r['given']:>10.2f}{r['predicted']:>11.2f}{r['rel_error']:>+9.1%}")
    if loo:
        print("\nleave-one-out (fit on the other two points; the held-out point's factor at its prior):")
        for r in loo:
            print(f"{r['held_out']:<36}{'':>14}{r['given']:>10.2f}{r['predicted']:>11.2f}{r['rel_error']:>+9.1%}")
    return 0


def _run_calibrate(args) -> int:
    from moge.sim import calibration as cal

    record = cal.calibrate(write_to=args.calibration_out)
    if args.json:
        _print_json(record)
        return 0
    f = record["fitted"]
    print(f"fitted: compute {f['compute']}, kv_attention {f['kv_attention']}, kernel_us {f['kernel_us']}")
    for r in record["residuals"]:
        print(f"  {r['point']:<36} given {r['given']:>8.2f}  fitted {r['predicted']:>8.2f}  {r['rel_error']:+.2%}")
    print("leave-one-out:")
    for r in record["leave_one_out"]:
        print(f"  {r['held_out']:<36} given {r['given']:>8.2f}  predicted {r['predicted']:>8.2f}  "
              f"{r['rel_error']:+.1%}")
    if args.calibration_out:
        print(f"written to {args.calibration_out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from moge.sim import search

    if args.arch:
        return _run_arch(args)
    model, name = _model(args)
    hw = load_hardware(args.hardware, args.calibration)
    devices = args.cards * hw.devices_per_card
    plans = None
    if args.plans != "all":
        plans = []
        for p in args.plans.split(","):
            plan = plan_preset(p.strip(), model, devices)
            plan.validate(model, devices)
            plans.append(plan)
    draft, acc = _mtp(args)
    choices = search.search_plans(model, hw, args.cards, args.stage, tpot_bound_ms=args.tpot_bound_ms,
                                  ttft_bound_ms=args.ttft_bound_ms, plans=plans, max_pp=args.max_pp,
                                  model_name=name, input_len=args.input_len, output_len=args.output_len,
                                  quant=args.quant, kv_cache=args.kv_cache, routing=args.routing,
                                  mtp_draft=draft, mtp_acceptance=acc, **_features(args))
    feasible = [c for c in choices if c.result is not None]
    if args.json:
        _print_json({"model": name, "hardware": hw.name, "cards": args.cards, "stage": args.stage,
                     "bound_ms": args.ttft_bound_ms if args.stage == "prefill" else args.tpot_bound_ms,
                     "best": feasible[0].as_dict() if feasible else None,
                     "plans": [c.as_dict() for c in choices]})
        return 0 if feasible else 1
    bound = args.ttft_bound_ms if args.stage == "prefill" else args.tpot_bound_ms
    print(f"{name} on {args.cards} x {hw.name}, {args.stage}, bound {bound} ms: {len(feasible)} feasible of "
          f"{len(choices)} plans")
    print(f"{'#':>3} {'batch':>6}{'TTFT ms':>10}{'TPOT ms':>9}{'tok/s/card':>12}{'GB/card':>9}  plan")
    for i, c in enumerate(feasible[: args.top]):
        r = c.result
        print(f"{i + 1:>3} {c.batch:>6}{r.ttft_ms:>10.1f}{r.tpot_ms:>9.2f}{r.throughput_tok_s_per_card:>12.1f}"
              f"{r.memory_gb_per_card:>9.1f}  {c.plan.describe(model)}")
    if not feasible:
        print("no plan meets the bound; reasons: " + "; ".join(sorted({c.note for c in choices})[:3]))
        return 1
    return 0


def _run_arch(args) -> int:
    from moge.sim import search

    targets = (search.DEFAULT_TARGETS if not args.targets
               else tuple(search.ArchTarget.parse(t.strip()) for t in args.targets.split(",")))
    for t in targets:
        load_hardware(t.hardware)  # clear error before the long run

    def progress(i: int, n: int) -> None:
        if not args.json and (i % 50 == 0 or i == n):
            print(f"  scored {i}/{n} candidates", file=sys.stderr)

    res = search.architecture_search(targets, grid=args.grid, input_len=args.input_len, output_len=args.output_len,
                                     quant=args.quant, progress=progress)
    d = res.as_dict()
    if args.uncertainty:
        def sample_progress(i: int, n: int) -> None:
            if not args.json:
                print(f"  uncertainty: search {i}/{n} done", file=sys.stderr)

        d["uncertainty"] = search.arch_uncertainty(targets, samples=args.samples, seed=args.seed, grid=args.grid,
                                                   input_len=args.input_len, output_len=args.output_len,
                                                   quant=args.quant, progress=sample_progress)
    if args.plot:
        from moge.sim.report import plot_arch_search

        plot_arch_search(d, args.plot)
        d["plot"] = args.plot
    if args.json:
        _print_json(d)
        return 0
    print(f"architecture search: {d['candidates']} MoGE candidates with 60-80B total parameters")
    ranks = d["pangu"]
    for j, t in enumerate(d["targets"]):
        r = ranks.get(f"t{j}")
        if r:
            print(f"  {t}: Pangu Pro MoE ranks {r['rank']} of {r['of']} (score {r['pangu_score']:.2f} x median; "
                  f"best {r['best']} at {r['best_score']:.2f})")
    r = ranks.get("combined")
    if r:
        print(f"  combined (geometric mean): rank {r['rank']} of {r['of']}; best {r['best']}")
    u = d.get("uncertainty")
    if u:
        print(f"  with uncertainty ({u['samples']} Monte Carlo draws of every ranged input): Pangu Pro MoE's rank")
        for key, q in u["quantiles"].items():
            label = d["targets"][int(key[1:])] if key.startswith("t") else "combined"
            print(f"    {label}: p10 {q['p10']:.0f}, p50 {q['p50']:.0f}, p90 {q['p90']:.0f} of {u['of']} "
                  f"(best {u['best_rank'][key]}, top-10 in {u['top10_share'][key]:.0%} of draws)")
    par = d["pangu_pareto_activated_vs_combined"]
    if par:
        print(f"  candidates with >= Pangu's activated parameters and a better combined score: "
              f"{len(par['dominated_by'])}")
    top = sorted(d["rows"], key=lambda r: -r["score"]["combined"])[:10]
    print(f"\n{'shape':<32}{'total B':>8}{'act. B':>8}" + "".join(f"{'t' + str(j):>9}" for j in range(len(targets)))
          + f"{'comb.':>8}")
    for row in top + [r for r in d["rows"] if r["pangu"]]:
        print(f"{row['shape']:<32}{row['total_b']:>8.1f}{row['activated_b']:>8.1f}"
              + "".join(f"{row['score']['t' + str(j)]:>9.2f}" for j in range(len(targets)))
              + f"{row['score']['combined']:>8.2f}" + ("  <- Pangu Pro MoE" if row["pangu"] else ""))
    if args.plot:
        print(f"\nscatter written to {args.plot}")
    return 0
