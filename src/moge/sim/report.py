"""Readable tables and matplotlib charts for simulator results (Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

from moge.sim.simulate import SimResult, op_group

GROUP_COLORS = {"attention": "#4C72B0", "moe": "#DD8452", "mlp": "#DD8452", "communication": "#55A868",
                "head": "#8172B3", "overhead": "#937860", "mtp": "#DA8BC3"}


def format_result(r: SimResult) -> str:
    s, d = r.scenario, r.as_dict()
    mem = d["memory"]["per_device_gb"]
    lines = [
        f"{s.model_name} on {s.cards} x {s.hardware.name} ({s.devices} devices), {s.stage}, batch {s.batch}, "
        f"input {s.input_len}, output {s.output_len}, {d['quant']}",
        f"  plan        {d['plan']['description']} ({d['plan']['replicas']} replica(s))",
    ]
    if d["straggler"]:
        st = d["straggler"]
        lines.append(f"  routing     {d['routing']}: busiest EP device does {st['factor']:.3f}x the mean expert work "
                     f"and reads {st['max_active_experts']:.1f} local experts")
    else:
        lines.append("  routing     dense model")
    ttft_note = "one prompt, unloaded" if s.stage == "decode" else "whole batch"
    lines += [
        f"  TTFT        {r.ttft_ms:9.2f} ms ({ttft_note})",
        f"  TPOT        {r.tpot_ms:9.2f} ms (step {r.step_ms:.2f} ms, {r.tokens_per_step:.2f} tokens per step)"
        if s.stage == "decode" else f"  TPOT        {r.tpot_ms:9.2f} ms (decode step at this batch)",
        f"  throughput  {r.throughput_tok_s_per_card:9.1f} tok/s per card ({r.throughput_tok_s:.1f} total, "
        f"{'output' if s.stage == 'decode' else 'prompt'} tokens)",
        f"  memory      {r.memory_gb_per_card:9.2f} GB per card of {d['memory']['capacity_per_card_gb']:.1f} "
        f"(per device: weights {mem['weights']:.2f}, KV cache {mem['kv_cache']:.2f}, workspace "
        f"{mem['workspace']:.2f}, reserve {mem['reserved']:.2f}); largest batch that fits: {r.max_batch}",
    ]
    eff = d["efficiency"]
    lines.append(f"  efficiency  compute {eff['compute']:.3f}, weights {eff['weight_stream']:.3f}, KV attention "
                 f"{eff['kv_attention']:.3f}, elementwise {eff['elementwise']:.3f}, link {eff['link']:.3f}, "
                 f"{eff['kernel_us']:.2f} us per kernel ({s.exec_mode} mode; fitted from {eff['from']})")
    met = d["bounds"]["met"]
    if met is not None:
        lines.append(f"  bound       {'met' if met else 'MISSED'} "
                     f"(TPOT <= {s.tpot_bound_ms}, TTFT <= {s.ttft_bound_ms})")
    lines.append("")
    lines.append(f"  time per {'step' if s.stage == 'decode' else 'prefill'} on the busiest device")
    lines.append(f"  {'operator':<28}{'group':<15}{'ms':>10}{'share':>8}")
    total = sum(d["breakdown"].values()) or 1.0
    for name, ms in d["breakdown"].items():
        if ms / total < 0.001:
            continue
        lines.append(f"  {name:<28}{op_group(name):<15}{ms:>10.3f}{ms / total:>8.1%}")
    lines.append(f"  {'total':<43}{total:>10.3f}")
    return "\n".join(lines)


def format_uncertainty(u: dict) -> str:
    """p10/p50/p90 of each metric and its three most influential inputs (uncertainty.as_dict())."""
    names = {"ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms", "throughput_tok_s_per_card": "tok/s per card"}
    lines = [f"  uncertainty ({u['samples']} Monte Carlo samples, calibrated factors refit per sample"
             + (f", {u['failed']} infeasible" if u["failed"] else "") + ")",
             f"  {'metric':<16}{'point':>10}{'p10':>10}{'p50':>10}{'p90':>10}   most sensitive to (Spearman rho)"]
    for m, label in names.items():
        q = u["quantiles"][m]
        sens = ", ".join(f"{r['input']} {r['rho']:+.2f}" for r in u["most_sensitive"][m])
        lines.append(f"  {label:<16}{u['point'][m]:>10.2f}{q['p10']:>10.2f}{q['p50']:>10.2f}{q['p90']:>10.2f}   {sens}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_breakdown(r: SimResult, path: str | Path) -> None:
    plt = _pyplot()
    items = [(k, v) for k, v in r.breakdown_ms().items() if v > 0]
    total = sum(v for _, v in items) or 1.0
    items = [(k, v) for k, v in items if v / total >= 0.002][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(items) + 1.6))
    ax.barh([k for k, _ in items], [v for _, v in items],
            color=[GROUP_COLORS.get(op_group(k), "#999999") for k, _ in items])
    s = r.scenario
    lat = f"TPOT {r.tpot_ms:.1f} ms" if s.stage == "decode" else f"TTFT {r.ttft_ms:.1f} ms"
    ax.set_title(f"{s.model_name} on {s.cards}x {s.hardware.name}, {s.stage} batch {s.batch}: {lat}, "
                 f"{r.throughput_tok_s_per_card:.0f} tok/s/card", fontsize=9)
    ax.set_xlabel("ms per step on the busiest device")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in GROUP_COLORS.values()]
    ax.legend(handles, list(GROUP_COLORS), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_arch_search(result_dict: dict, path: str | Path) -> None:
    """Scatter like the paper's Fig. 3: normalised throughput per target, Pangu Pro MoE starred."""
    plt = _pyplot()
    rows, targets = result_dict["rows"], result_dict["targets"]
    n = len(targets)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.6 * (n + 1), 4.2))
    for j, ax in enumerate(axes[:n]):
        xs = [r["activated_b"] for r in rows]
        ys = [r["score"][f"t{j}"] for r in rows]
        cs = [r["config"]["num_layers"] for r in rows]
        sc = ax.scatter(xs, ys, c=cs, cmap="viridis", s=14, alpha=0.8)
        for r in rows:
            if r["pangu"]:
                ax.scatter([r["activated_b"]], [r["score"][f"t{j}"]], marker="*", s=260, color="red",
                           edgecolor="black", zorder=5, label="Pangu Pro MoE")
        ax.set_xlabel("activated parameters (B)")
        ax.set_ylabel("throughput per card / median candidate")
        ax.set_title(targets[j], fontsize=9)
        ax.legend(fontsize=7)
        fig.colorbar(sc, ax=ax, label="layers")
    ax = axes[n]
    if n >= 2:
        xs = [r["score"]["t0"] for r in rows]
        ys = [r["score"]["t1"] for r in rows]
        ax.scatter(xs, ys, s=14, alpha=0.7, color="#4C72B0")
        for r in rows:
            if r["pangu"]:
                ax.scatter([r["score"]["t0"]], [r["score"]["t1"]], marker="*", s=260, color="red",
                           edgecolor="black", zorder=5, label="Pangu Pro MoE")
        ax.set_xlabel(f"normalised throughput: {targets[0]}", fontsize=8)
        ax.set_ylabel(f"normalised throughput: {targets[1]}", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_title(f"{len(rows)} MoGE candidates, 60-80B total", fontsize=9)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curve(xs, ys, path: str | Path, xlabel: str, ylabel: str, title: str, points=None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "-o", ms=3, label="simulated")
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="red", zorder=5, label="paper")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
