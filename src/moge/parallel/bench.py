"""`moge bench-ep`: MoGE against top-K on real expert-parallel processes.

For each expert-parallel size, one gloo process group of that many CPU processes; every rank routes
its own T tokens (T = tokens per rank, the batch of one data-parallel rank) with the same logits
source for both routers, dispatches them with the real all_to_all dispatcher, runs its local experts
and combines. Per rank and step it records rows received, expert compute time as wall-clock time and
as the thread's own CPU time (with one torch thread the matmuls run on the calling thread; on an
oversubscribed CPU the wall time includes waiting for a core, the CPU time does not), the FLOP/s that
the CPU time implies, and the whole step's wall time.

Routing sources:
  uniform   i.i.d. standard normal logits: every expert equally likely
  trained   the router logits of a trained checkpoint on real text (`--checkpoint`), or, without one,
  skewed    synthetic logits with a fixed per-expert popularity offset (labelled as synthetic)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moge.config import MoEConfig
from moge.errors import ConfigError


@dataclass
class BenchConfig:
    hidden_size: int = 256
    expert_intermediate_size: int = 128
    num_experts: int = 64
    num_groups: int = 8
    top_k: int = 8
    ep_sizes: tuple[int, ...] = (2, 4, 8)
    tokens: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    repeats: int = 3
    skew: float = 1.0  # std of the per-expert popularity offset of the skewed synthetic source
    seed: int = 0
    timeout_s: float = 600.0
    routers: tuple[str, ...] = ("grouped", "topk")
    sources: dict = field(default_factory=dict)  # name -> logits pool [P, N] (filled by run_bench)

    def moe(self, router: str) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, num_experts=self.num_experts, top_k=self.top_k,
                         num_groups=self.num_groups, expert_intermediate_size=self.expert_intermediate_size,
                         router=router, backend="loop")


def synthetic_logits(kind: str, rows: int, num_experts: int, seed: int, skew: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, num_experts, generator=gen)
    if kind == "skewed":
        popularity = torch.randn(num_experts, generator=torch.Generator().manual_seed(12345)) * skew
        logits = logits + popularity
    return logits


def checkpoint_logits(checkpoint: str | Path, data: str | Path, max_tokens: int = 32768,
                      layer: int | None = None) -> tuple[torch.Tensor, dict]:
    """Router logits of a trained model on the prepared corpus's validation text: [tokens, N] of one
    layer (default: the middle one), and a description."""
    from moge.checkpoint import load_pretrained
    from moge.data.shards import TokenShards

    model = load_pretrained(checkpoint).eval()
    cfg = model.config
    if not cfg.is_moe:
        raise ConfigError(f"--checkpoint {checkpoint} is a dense model: it has no router")
    layer = cfg.num_layers // 2 if layer is None else layer
    shards = TokenShards(data)
    captured: list[torch.Tensor] = []
    router = model.model.layers[layer].mlp.router
    hook = router.register_forward_hook(lambda _m, _i, out: captured.append(out.logits_TN.detach().float()))
    seen = 0
    with torch.no_grad():
        for domain in shards.domains:
            # windows come with one extra token (the last target); the model reads the inputs
            for arr in shards.val_batches(domain, seq_len=min(256, cfg.max_position_embeddings - 1), batch_size=8):
                model(torch.from_numpy(arr[:, :-1]))
                seen += arr.size
                if seen >= max_tokens:
                    break
    hook.remove()
    if not captured:
        raise ConfigError(f"{data} has no validation windows of {min(256, cfg.max_position_embeddings - 1) + 1} "
                         f"tokens to route")
    logits = torch.cat([c.reshape(-1, cfg.num_experts) for c in captured])[:max_tokens]
    info = {"checkpoint": str(checkpoint), "layer": layer, "tokens": int(logits.shape[0]),
            "num_experts": cfg.num_experts, "num_groups": cfg.num_groups, "top_k": cfg.top_k,
            "trained_router": cfg.router}
    return logits, info


def _worker(rank: int, world: int, cfg: BenchConfig) -> list[dict]:
    """One rank: every (source, router, tokens) case, `repeats` timed steps after one warm-up."""
    import torch.distributed as dist

    from moge.degrees import check_expert_parallel
    from moge.nn.experts import SwiGLUExperts
    from moge.nn.routing import route
    from moge.parallel.dispatch import AllToAllDispatcher
    from moge.parallel.mesh import ExpertParallelMesh

    mesh = ExpertParallelMesh.build(world)
    n, per = cfg.num_experts, cfg.num_experts // world
    torch.manual_seed(cfg.seed)
    experts = SwiGLUExperts(n, cfg.hidden_size, cfg.expert_intermediate_size, backend="loop")
    local = SwiGLUExperts(per, cfg.hidden_size, cfg.expert_intermediate_size, backend="loop")
    with torch.no_grad():
        local.gate_up_proj.copy_(experts.gate_up_proj[rank * per:(rank + 1) * per])
        local.down_proj.copy_(experts.down_proj[rank * per:(rank + 1) * per])
    del experts
    flop_per_row = 6 * cfg.hidden_size * cfg.expert_intermediate_size
    dispatchers = {}
    for router in cfg.routers:
        moe = cfg.moe(router)
        check_expert_parallel(moe, world)
        known = moe.top_k_per_group * (moe.num_groups // world) if router == "grouped" else None
        dispatchers[router] = (moe, AllToAllDispatcher(n, mesh.ep_group, known))
    rows = []
    for source, pool in cfg.sources.items():
        for T in cfg.tokens:
            gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank + T)
            x = torch.randn(T, cfg.hidden_size, generator=gen)
            # this rank's tokens: its own stretch of the logits pool (wrapping around)
            idx = (torch.arange(T) + (rank * T) % pool.shape[0]) % pool.shape[0]
            routings = {router: route(pool[idx], moe) for router, (moe, _) in dispatchers.items()}
            # the routers alternate step by step, so drifts in machine load hit both alike
            for rep in range(cfg.repeats + 1):
                for router, (_, disp) in dispatchers.items():
                    routing = routings[router]
                    dist.barrier()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        d = disp.dispatch(x, routing.experts_TK)
                        c0, w0 = time.thread_time(), time.perf_counter()
                        out = local(d.x_RD, d.local_expert_R.unsqueeze(1), torch.ones(d.x_RD.shape[0], 1))
                        w1, c1 = time.perf_counter(), time.thread_time()
                        disp.combine(out, d, routing.weights_TK)
                    step = time.perf_counter() - t0
                    if rep == 0:
                        continue  # warm-up
                    received = int(d.x_RD.shape[0])
                    rows.append({"source": source, "router": router, "ep": world, "tokens": T, "rank": rank,
                                 "repeat": rep, "received": received, "expert_wall_s": w1 - w0,
                                 "expert_cpu_s": c1 - c0, "step_wall_s": step,
                                 "expert_gflops_cpu": received * flop_per_row / max(c1 - c0, 1e-9) / 1e9})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (source, router, ep, tokens): max/mean over ranks of each per-rank quantity, median over
    repeats."""
    import statistics

    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        key = (r["source"], r["router"], r["ep"], r["tokens"])
        groups.setdefault(key, {}).setdefault(r["repeat"], []).append(r)
    out = []
    for (source, router, ep, tokens), reps in sorted(groups.items()):
        def stat(name, reduce, reps=reps):
            return statistics.median(reduce([r[name] for r in ranks]) for ranks in reps.values())

        def max_over_mean(name):
            return stat(name, lambda v: max(v) / max(sum(v) / len(v), 1e-12))

        out.append({"source": source, "router": router, "ep": ep, "tokens_per_rank": tokens,
                    "received_max": stat("received", max), "received_mean": stat("received", lambda v: sum(v) / len(v)),
                    "received_max_over_mean": max_over_mean("received"),
                    "expert_wall_ms_max": 1e3 * stat("expert_wall_s", max),
                    "expert_wall_max_over_mean": max_over_mean("expert_wall_s"),
                    "expert_cpu_ms_max": 1e3 * stat("expert_cpu_s", max),
                    "expert_cpu_max_over_mean": max_over_mean("expert_cpu_s"),
                    "expert_gflops_cpu_mean": stat("expert_gflops_cpu", lambda v: sum(v) / len(v)),
                    "step_wall_ms_max": 1e3 * stat("step_wall_s", max),
                    "step_wall_max_over_mean": max_over_mean("step_wall_s")})
    return out


def run_bench(cfg: BenchConfig, *, checkpoint: str | None = None, data: str | None = None,
              progress=None) -> dict:
    """Run every expert-parallel size; return {"config", "sources", "rows" (per rank), "summary"}."""
    from moge.parallel.launch import spawn

    pool_rows = max(cfg.tokens) * max(cfg.ep_sizes)
    info: dict = {"uniform": "i.i.d. N(0, 1) logits"}
    sources = {"uniform": synthetic_logits("uniform", pool_rows, cfg.num_experts, cfg.seed, cfg.skew)}
    if checkpoint:
        from moge.checkpoint import read_config

        found = read_config(checkpoint)
        if (found.num_experts, found.num_groups, found.top_k) != (cfg.num_experts, cfg.num_groups, cfg.top_k):
            raise ConfigError(f"--checkpoint has num_experts={found.num_experts}, num_groups={found.num_groups}, "
                             f"top_k={found.top_k}; the benchmark layer has {cfg.num_experts}, {cfg.num_groups}, "
                             f"{cfg.top_k}: pass --experts {found.num_experts} --groups {found.num_groups} "
                             f"--top-k {found.top_k}")
        logits, meta = checkpoint_logits(checkpoint, data or "data/corpus", max_tokens=pool_rows)
        sources["trained"] = logits
        info["trained"] = meta | {"note": "router logits of a trained checkpoint on validation text"}
    else:
        sources["skewed"] = synthetic_logits("skewed", pool_rows, cfg.num_experts, cfg.seed + 1, cfg.skew)
        info["skewed"] = (f"SYNTHETIC: N(0, 1) logits plus a fixed per-expert popularity offset N(0, {cfg.skew}^2); "
                          f"not a trained router")
    cfg.sources = sources
    rows: list[dict] = []
    skipped = []
    for ep in cfg.ep_sizes:
        bad = [r for r in cfg.routers if _invalid(cfg.moe(r), ep)]
        if bad:
            skipped.append({"ep": ep, "reason": _invalid(cfg.moe(bad[0]), ep)})
            continue
        if progress:
            progress(f"expert-parallel size {ep}: {ep} processes")
        for per_rank in spawn(_worker, ep, cfg, timeout_s=cfg.timeout_s):
            rows.extend(per_rank)
    config = {k: v for k, v in asdict(cfg).items() if k != "sources"}
    summary = summarize(rows)
    return {"config": config, "sources": info, "skipped": skipped, "rows": rows, "summary": summary,
            "comparison": router_comparison(summary), "cpu_count": _cpu_count(), "torch": torch.__version__}


def _invalid(moe: MoEConfig, ep: int) -> str:
    from moge.degrees import check_expert_parallel

    try:
        check_expert_parallel(moe, ep)
    except ValueError as e:
        return str(e)
    return ""


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def format_table(summary: list[dict]) -> str:
    head = ("source", "router", "EP", "tok/rank", "recv max/mean", "cpu max/mean", "wall max/mean",
            "step max/mean", "step max ms", "GFLOP/s (cpu)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for s in summary:
        lines.append(" | ".join([s["source"], s["router"], str(s["ep"]), str(s["tokens_per_rank"]),
                                 f"{s['received_max_over_mean']:.2f}", f"{s['expert_cpu_max_over_mean']:.2f}",
                                 f"{s['expert_wall_max_over_mean']:.2f}", f"{s['step_wall_max_over_mean']:.2f}",
                                 f"{s['step_wall_ms_max']:.1f}", f"{s['expert_gflops_cpu_mean']:.1f}"]))
    return "\n".join(lines)


def router_comparison(summary: list[dict]) -> list[dict]:
    """MoGE against top-K on the same case. `critical_ms` is the busiest rank's expert CPU time: the
    expert part of the step on hardware with a core per rank, where every rank waits for the busiest
    one in the combine all_to_all. (With more processes than cores, wall times measure the shared
    cores, not the straggler.)"""
    by = {(s["source"], s["router"], s["ep"], s["tokens_per_rank"]): s for s in summary}
    out = []
    for (source, router, ep, tokens), moge in sorted(by.items()):
        topk = by.get((source, "topk", ep, tokens))
        if router != "grouped" or topk is None:
            continue
        out.append({"source": source, "ep": ep, "tokens_per_rank": tokens,
                    "moge_received_max_over_mean": moge["received_max_over_mean"],
                    "topk_received_max_over_mean": topk["received_max_over_mean"],
                    "moge_critical_ms": moge["expert_cpu_ms_max"], "topk_critical_ms": topk["expert_cpu_ms_max"],
                    "topk_over_moge_critical": topk["expert_cpu_ms_max"] / max(moge["expert_cpu_ms_max"], 1e-9),
                    "moge_step_ms": moge["step_wall_ms_max"], "topk_step_ms": topk["step_wall_ms_max"]})
    return out


def format_comparison(rows: list[dict]) -> str:
    head = ("source", "EP", "tok/rank", "recv max/mean MoGE", "top-K", "busiest expert CPU ms MoGE", "top-K",
            "top-K/MoGE", "step wall ms MoGE", "top-K")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([r["source"], str(r["ep"]), str(r["tokens_per_rank"]),
                                 f"{r['moge_received_max_over_mean']:.2f}", f"{r['topk_received_max_over_mean']:.2f}",
                                 f"{r['moge_critical_ms']:.1f}", f"{r['topk_critical_ms']:.1f}",
                                 f"{r['topk_over_moge_critical']:.2f}", f"{r['moge_step_ms']:.1f}",
                                 f"{r['topk_step_ms']:.1f}"]))
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> Path:
    """Rows-received and expert-CPU-time max/mean against tokens per rank, per source and EP size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moge.io import save_figure

    sources = sorted({s["source"] for s in summary})
    fig, axes = plt.subplots(len(sources), 2, figsize=(11, 3.6 * len(sources)), squeeze=False)
    styles = {"grouped": "-", "topk": "--"}
    for i, source in enumerate(sources):
        for j, (key, title) in enumerate([("received_max_over_mean", "rows received, busiest rank / mean"),
                                          ("expert_cpu_max_over_mean", "expert CPU time, busiest rank / mean")]):
            ax = axes[i][j]
            for ep in sorted({s["ep"] for s in summary}):
                for router in ("grouped", "topk"):
                    pts = [(s["tokens_per_rank"], s[key]) for s in summary
                           if s["source"] == source and s["ep"] == ep and s["router"] == router]
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        name = "MoGE" if router == "grouped" else "top-K"
                        ax.plot(xs, ys, styles[router], marker="o", label=f"{name} EP{ep}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per rank")
            ax.set_title(f"{source}: {title}", fontsize=10)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(result: dict, out: Path) -> dict[str, str]:
    from moge.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench_ep.json"
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    png = plot(result["summary"], out / "bench_ep.png")
    md = out / "bench_ep.md"
    atomic_write_text(md, format_table(result["summary"]) + "\n\n" + format_comparison(result["comparison"]) + "\n")
    return {"json": str(json_path), "png": str(png), "table": str(md)}
