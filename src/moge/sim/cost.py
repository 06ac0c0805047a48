"""Operator-level cost of one forward step on the busiest device of a pipeline stage.

Each physical stream has its own efficiency (hardware.Efficiency), so a factor set by one regime
is not charged to another:

    dense GEMM      t = max(FLOPs / (peak[dtype] * compute),  traffic / (bw * weight_stream))
                    traffic = W * r(m, W) + A * r(n, A) + out, r(x, B) = 1 if B fits the cache else max(1, x / tile)
    grouped GEMM    as dense, with rows m + A_act * gmm_tile_m / 2 (half a tile of padding per active
                    expert) at compute * gmm_rel, and weights read max(A_act, m / tile) times
    attention       t = max(FLOPs / (peak16 * compute), KV / (bw * kv_attention) + QO / (bw * elementwise))
                        + sequences * attn_seq_us
    elementwise     t = bytes / (bw * elementwise)
    collective      t = alpha-beta cost on the interconnect level its group spans (collectives.py)

Every launched kernel also costs `kernel_us` of device time (the "overhead" line) and `host_us` of
host time. Graph mode: the step is the device time. Eager mode: max(host, device); a host-bound
excess appears as its own line. With `overlap_comm`, a fraction `comm_overlap` of the shorter of
(communication, everything else) is hidden; otherwise nothing overlaps.

One decoder layer is built once per step shape and multiplied by the layers of a stage. The
routed-expert GEMM reads only the experts that received tokens (at most `voted_experts` per group
when voting is on) and computes the busiest device's assignments (straggler.py); under attention
DP the busiest DP rank holds ceil(sequences / attn_dp) sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moge.config import ModelConfig
from moge.sim.collectives import collective_time_s
from moge.sim.hardware import HardwareProfile
from moge.sim.plans import ParallelPlan, kv_heads_per_device
from moge.sim.quant import QuantScheme
from moge.sim.straggler import LoadStats, RoutingModel, load_stats


@dataclass
class Op:
    """One operator on the busiest device: its time, and what that time is made of."""

    name: str
    time_s: float
    flops: float = 0.0
    bytes: float = 0.0  # memory traffic, or bytes sent for a collective
    launches: int = 1
    bound: str = ""  # compute | memory | link
    weight_bytes: float = 0.0  # part of `bytes` that is weights
    kv_bytes: float = 0.0  # part of `bytes` that is KV cache


@dataclass(frozen=True)
class StepShape:
    """What one replica's stage processes in one forward.

    seqs            sequences in this (micro-)batch on the replica
    tokens_per_seq  new tokens per sequence (prompt length in prefill; 1 + draft tokens in decode)
    context_len     keys each sequence attends to after this step (prompt, or cache + new tokens)
    logits_per_seq  tokens per sequence that need logits (1 in prefill)
    """

    seqs: int
    tokens_per_seq: int
    context_len: int
    logits_per_seq: int


EXEC_MODES = ("graph", "eager")


@dataclass
class StepCost:
    """Per-operator device times (seconds, summed over the layers of a stage), launches and host time.

    `ops` sums to the step time once `finish` has run: it then also holds the hidden communication
    (a negative "comm_overlap" line) and, in eager mode, the host-bound excess ("host_bound").
    """

    ops: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Op] = field(default_factory=dict)
    load: LoadStats | None = None
    traffic: dict[str, float] = field(default_factory=dict)  # bytes per step: weights, kv_cache, collectives
    launches: float = 0.0
    comm_s: float = 0.0

    def add(self, op: Op, times: float = 1.0, overhead_s: float = 0.0, prefix: str = "") -> None:
        key = prefix + op.name
        self.ops[key] = self.ops.get(key, 0.0) + op.time_s * times
        self.ops["overhead"] = self.ops.get("overhead", 0.0) + op.launches * overhead_s * times
        self.launches += op.launches * times
        if op.bound == "link":
            self.comm_s += op.time_s * times
        for kind, b in (("weights", op.weight_bytes), ("kv_cache", op.kv_bytes),
                        ("collectives", op.bytes if op.bound == "link" else 0.0)):
            self.traffic[kind] = self.traffic.get(kind, 0.0) + b * times
        if key not in self.detail:
            self.detail[key] = op

    def scale(self, factor: float) -> "StepCost":
        return StepCost({k: v * factor for k, v in self.ops.items()}, dict(self.detail), self.load,
                        {k: v * factor for k, v in self.traffic.items()}, self.launches * factor,
                        self.comm_s * factor)

    def finish(self, host_us: float, exec_mode: str = "graph", overlap: float = 0.0) -> "StepCost":
        """Apply overlap and the host/device rule (see module doc); returns self."""
        device = sum(self.ops.values())
        if overlap > 0:
            hidden = overlap * min(self.comm_s, device - self.comm_s)
            self.ops["comm_overlap"] = -hidden
            device -= hidden
        if exec_mode == "eager":
            host = self.launches * host_us * 1e-6
            if host > device:
                self.ops["host_bound"] = host - device
        return self

    @property
    def total_s(self) -> float:
        return sum(self.ops.values())


class CostModel:
    """Builds and costs the operators of a model under one plan, quantization and routing model."""

    def __init__(self, model: ModelConfig, hardware: HardwareProfile, plan: ParallelPlan, quant: QuantScheme,
                 routing: RoutingModel | None, voted_experts: int | None = None, exec_mode: str = "graph",
                 overlap_comm: bool = False):
        self.model, self.hw, self.plan, self.quant, self.routing = model, hardware, plan, quant, routing
        self.eff = hardware.efficiency
        self.overhead_s = self.eff.kernel_us * 1e-6
        self.voted_experts = voted_experts
        self.exec_mode = exec_mode
        self.overlap = self.eff.comm_overlap if overlap_comm else 0.0

    # ---- primitive costs --------------------------------------------------------------------
    def _stream_s(self, nbytes: float, efficiency: float) -> float:
        return nbytes / (self.hw.memory_Bps * efficiency)

    def _compute_s(self, flops: float, dtype: str, relative: float = 1.0) -> float:
        return flops / (self.hw.peak_flops(dtype) * self.eff.compute * relative) if flops else 0.0

    def roofline(self, name: str, flops: float, nbytes: float, dtype: str, launches: int = 1,
                 stream: float | None = None) -> Op:
        """max(compute, memory) with the weight-streaming efficiency unless `stream` is given."""
        t_c = self._compute_s(flops, dtype)
        t_m = self._stream_s(nbytes, self.eff.weight_stream if stream is None else stream)
        return Op(name, max(t_c, t_m), flops, nbytes, launches, "compute" if t_c > t_m else "memory")

    def rereads(self, rows: float, operand_bytes: float) -> float:
        """How often an operand is read from DRAM when the other operand spans `rows` output rows: once
        if it fits in the on-chip cache (`cache_mib`), else once per output tile of `gemm_tile` rows
        (the continuous form of ceil(rows / tile))."""
        if operand_bytes <= self.eff.cache_mib * 2**20:
            return 1.0
        return max(1.0, rows / self.eff.gemm_tile)

    def gemm(self, name: str, m: float, k: float, n: float, w_bytes: float, in_bytes: float, out_bytes: float,
             dtype: str) -> Op:
        """[m, k] x [k, n]: weights re-read once per tile of m rows, activations once per tile of n."""
        weights = k * n * w_bytes * self.rereads(m, k * n * w_bytes)
        acts = m * k * in_bytes * self.rereads(n, m * k * in_bytes)
        op = self.roofline(name, 2.0 * m * k * n, weights + acts + m * n * out_bytes, dtype)
        op.weight_bytes = weights
        return op

    def _swiglu_bytes(self, tokens: float, width: float) -> float:
        """Activation traffic of gate/up ([T, d] x [d, 2I]) and down ([T, I] x [I, d]), with re-reads."""
        d, q = self.model.hidden_size, self.quant
        x_in, x_mid = tokens * d * q.act_bytes, tokens * width * q.act_bytes
        return (x_in * self.rereads(2 * width, x_in) + x_mid * self.rereads(d, x_mid)
                + tokens * (2 * width * q.float_bytes + d * q.float_bytes))

    def swiglu(self, name: str, tokens: float, width: float, weight_experts: float) -> Op:
        """gate/up/down of a dense SwiGLU MLP over `tokens` rows, reading `weight_experts` weight sets."""
        d, q = self.model.hidden_size, self.quant
        one = 3 * d * width * q.weight_bytes
        weights = weight_experts * one * self.rereads(tokens, one)
        op = self.roofline(name, 2.0 * 3 * d * width * tokens, weights + self._swiglu_bytes(tokens, width),
                           q.gemm_dtype, launches=3)
        op.weight_bytes = weights
        return op

    def grouped_swiglu(self, name: str, rows: float, width: float, active: float) -> Op:
        """Routed experts as one grouped GEMM: `rows` token-expert rows over `active` experts.

        Each active expert pads its rows to the M tile (half a tile on average), and the grouped
        kernel runs at gmm_rel of a dense GEMM's rate; an expert's weights are read once per tile
        of its rows (max(active, rows / tile) weight sets in all).
        """
        d, q, e = self.model.hidden_size, self.quant, self.eff
        padded = rows + active * e.gmm_tile_m / 2
        t_c = self._compute_s(2.0 * 3 * d * width * padded, q.gemm_dtype, e.gmm_rel)
        one = 3 * d * width * q.weight_bytes
        weights = one * (active if one <= e.cache_mib * 2**20 else max(active, rows / e.gemm_tile))
        nbytes = weights + self._swiglu_bytes(rows, width)
        t_m = self._stream_s(nbytes, e.weight_stream)
        op = Op(name, max(t_c, t_m), 2.0 * 3 * d * width * rows, nbytes, 3, "compute" if t_c > t_m else "memory")
        op.weight_bytes = weights
        return op

    def attention(self, name: str, flops: float, kv_bytes: float, qo_bytes: float, seqs: int, dtype: str) -> Op:
        """Attention over the KV cache: its own bandwidth efficiency plus a fixed cost per sequence."""
        t_c = self._compute_s(flops, dtype)
        t_m = self._stream_s(kv_bytes, self.eff.kv_attention) + self._stream_s(qo_bytes, self.eff.elementwise)
        op = Op(name, max(t_c, t_m) + seqs * self.eff.attn_seq_us * 1e-6, flops, kv_bytes + qo_bytes, 2,
                "compute" if t_c > t_m else "memory")
        op.kv_bytes = kv_bytes
        return op

    def elementwise(self, name: str, nbytes: float, launches: int = 1) -> Op:
        return Op(name, self._stream_s(nbytes, self.eff.elementwise), 0.0, nbytes, launches, "memory")

    def comm(self, name: str, kind: str, nbytes: float, group: int, span: int) -> Op | None:
        """A collective over `group` devices whose members lie within `span` consecutive devices."""
        if group <= 1 or nbytes <= 0:
            return None
        level = self.hw.level_for(span)
        t = collective_time_s(kind, nbytes, group, level, self.eff.link)
        return Op(name, t, 0.0, nbytes, 1, "link")

    # ---- one decoder layer ------------------------------------------------------------------
    def layer_ops(self, shape: StepShape) -> tuple[list[Op], LoadStats | None]:
        m, p, q = self.model, self.plan, self.quant
        d, hd = m.hidden_size, m.head_size
        a_tp, a_dp, stage = p.attn_tp, p.attn_dp, p.stage_devices
        fb, ab = q.float_bytes, q.act_bytes
        h_loc = m.num_heads // a_tp
        kv_loc = kv_heads_per_device(m, p)
        seqs_a = math.ceil(shape.seqs / a_dp)
        t_a = seqs_a * shape.tokens_per_seq  # tokens of the busiest attention DP rank
        t_all = t_a * a_dp  # tokens of the stage (DP groups padded to equal size for collectives)
        t_real = shape.seqs * shape.tokens_per_seq  # tokens that are routed and computed
        sharded = p.comm_rewrite and a_tp > 1

        def shard(tokens: int) -> int:
            return math.ceil(tokens / a_tp) if sharded else tokens

        ops: list[Op | None] = []
        # -- attention ------------------------------------------------------------------------
        if sharded:  # the previous layer left token shards; gather the quantized, normed rows
            ops.append(self.comm("attn_all_gather", "all_gather", t_a * d * ab, a_tp, a_tp))
        ops.append(self.elementwise("norm_residual", 2 * shard(t_a) * d * (3 * fb + ab), launches=2))
        ops.append(self.gemm("qkv_proj", t_a, d, (h_loc + 2 * kv_loc) * hd, q.weight_bytes, ab, fb, q.gemm_dtype))
        ops.append(self.elementwise("rope_kv_write", t_a * (h_loc + kv_loc) * hd * 2 * fb
                                    + t_a * 2 * kv_loc * hd * q.kv_bytes))
        new = shape.tokens_per_seq
        keys = max(1.0, shape.context_len - (new - 1) / 2)  # causal: mean keys per new token
        attn_flops = 4.0 * t_a * keys * hd * h_loc
        kv_read = seqs_a * shape.context_len * 2 * kv_loc * hd * q.kv_bytes
        ops.append(self.attention("attention", attn_flops, kv_read, t_a * h_loc * hd * 2 * fb, seqs_a,
                                  q.float_dtype))
        ops.append(self.gemm("o_proj", t_a, h_loc * hd, d, q.weight_bytes, ab, fb, q.gemm_dtype))
        if a_tp > 1:
            if sharded:
                ops.append(self.comm("attn_reduce_scatter", "reduce_scatter", t_a * d * fb, a_tp, a_tp))
            else:
                ops.append(self.comm("attn_all_reduce", "all_reduce", t_a * d * fb, a_tp, a_tp))
        # -- MLP part: always-on MLP (shared expert / dense MLP) and routed experts ------------
        width = m.shared_expert_intermediate_size if m.is_moe else m.intermediate_size
        stats = None
        if p.layout(m) == "stage":
            if p.comm_rewrite:
                ops.append(self.comm("mlp_all_gather", "all_gather", t_all * d * ab, stage, stage))
            elif a_dp > 1:
                ops.append(self.comm("mlp_all_gather", "all_gather", t_all * d * fb, a_dp, stage))
            if m.is_moe:
                stats = self._expert_ops(ops, t_real, t_real)
            if width:
                t_sh = math.ceil(t_real * p.dense_tp / stage)
                ops.append(self.swiglu("shared_expert" if m.is_moe else "mlp", t_sh, width / p.dense_tp, 1))
            if p.comm_rewrite:
                ops.append(self.comm("mlp_reduce_scatter", "reduce_scatter", t_all * d * fb, stage, stage))
            else:
                ops.append(self.comm("mlp_all_reduce", "all_reduce", t_all * d * fb, stage, stage))
        else:  # attention layout: always-on MLP shares attention's TP, routed tokens go all-to-all
            if width and sharded:
                ops.append(self.comm("mlp_all_gather", "all_gather", t_a * d * ab, a_tp, a_tp))
            if width:
                ops.append(self.swiglu("shared_expert" if m.is_moe else "mlp", t_a, width / a_tp, 1))
            if m.is_moe:
                own = math.ceil(t_a / a_tp)
                stats = self._expert_ops(ops, own, t_real, alltoall=True)
            if a_tp > 1:
                if width:
                    kind, name = (("reduce_scatter", "mlp_reduce_scatter") if sharded
                                  else ("all_reduce", "mlp_all_reduce"))
                    ops.append(self.comm(name, kind, t_a * d * fb, a_tp, a_tp))
                elif not sharded:
                    ops.append(self.comm("mlp_all_gather", "all_gather", t_a * d * fb, a_tp, a_tp))
        return [op for op in ops if op is not None], stats

    def _expert_ops(self, ops: list, router_tokens: int, routed_tokens: int, alltoall: bool = False) -> LoadStats:
        """Router, dispatch/permute, grouped expert GEMMs on the busiest device, combine."""
        m, p, q = self.model, self.plan, self.quant
        d, n = m.hidden_size, m.num_experts
        fb, ab = q.float_bytes, q.act_bytes
        ep = p.expert_ep
        stats = load_stats(self.routing, n, m.top_k, m.num_groups, ep, routed_tokens)
        router = self.gemm("router", router_tokens, d, n, fb, fb, 4, q.float_dtype)
        router.time_s += self._stream_s(router_tokens * n * 4 * 2, self.eff.elementwise)  # softmax + top-k
        router.launches = 2
        ops.append(router)
        if alltoall and ep > 1:
            remote = stats.devices_per_token * (1 - 1 / ep) * stats.straggler_factor
            ops.append(self.comm("moe_dispatch_all_to_all", "all_to_all", router_tokens * remote * d * ab,
                                 ep, p.stage_devices))
        load = stats.max_load
        ops.append(self.elementwise("expert_permute", (routed_tokens + load) * d * (ab + fb), launches=2))
        width = m.expert_intermediate_size / p.expert_tp
        ops.append(self.grouped_swiglu("routed_experts", load, width, self.active_experts(stats)))
        if alltoall and ep > 1:
            remote = stats.devices_per_token * (1 - 1 / ep) * stats.straggler_factor
            ops.append(self.comm("moe_combine_all_to_all", "all_to_all", router_tokens * remote * d * fb,
                                 ep, p.stage_devices))
        return stats

    def active_experts(self, stats: LoadStats) -> float:
        """Distinct local experts the busiest device reads: the Monte Carlo's expectation, capped by
        voting (each group keeps `voted_experts` experts per batch, the 300I Duo release's rule)."""
        if not self.voted_experts:
            return stats.max_active_experts
        m, ep = self.model, self.plan.expert_ep
        if self.routing is not None and self.routing.grouped:
            cap = self.voted_experts * max(1.0, m.num_groups / ep)
        else:
            cap = min(self.voted_experts, m.num_experts / ep)
        return min(stats.max_active_experts, cap)

    # ---- per-step extras ----------------------------------------------------------------------
    def head_ops(self, shape: StepShape, first_stage: bool = True, last_stage: bool = True) -> list[Op]:
        """Embedding lookup (first stage); final norm, vocab-parallel lm_head and sampling (last)."""
        m, p, q = self.model, self.plan, self.quant
        d, fb = m.hidden_size, q.float_bytes
        stage = p.stage_devices
        t_a = math.ceil(shape.seqs / p.attn_dp) * shape.tokens_per_seq
        ops: list[Op | None] = []
        if first_stage:
            ops.append(self.elementwise("embedding", t_a * d * fb * 2))
        if last_stage:
            t_lg = math.ceil(shape.seqs / p.attn_dp) * p.attn_dp * shape.logits_per_seq
            ops.append(self.elementwise("final_norm", t_lg * d * fb * 3))
            ops.append(self.comm("lm_head_all_gather", "all_gather", t_lg * d * fb, stage, stage))
            v_loc = m.vocab_size / stage
            ops.append(self.gemm("lm_head", t_lg, d, v_loc, fb, fb, 4, q.float_dtype))
            ops.append(self.elementwise("sampling", t_lg * v_loc * 4 * 2, launches=2))
        return [op for op in ops if op is not None]

    def mtp_ops(self, shape: StepShape) -> list[Op]:
        """One MTP draft forward (DeepSeek-V3 style): concat-projection, one decoder layer shaped
        like the model's own, and the shared lm_head; over one token per sequence."""
        one = StepShape(shape.seqs, 1, shape.context_len, 1)
        t_a = math.ceil(shape.seqs / self.plan.attn_dp)
        d, q = self.model.hidden_size, self.quant
        ops = [self.gemm("mtp_proj", t_a, 2 * d, d / self.plan.attn_tp, q.weight_bytes, q.act_bytes,
                         q.float_bytes, q.gemm_dtype)]
        layer, _ = self.layer_ops(one)
        ops += layer
        ops += self.head_ops(one, first_stage=True, last_stage=True)
        return ops

    # ---- a stage and a step ------------------------------------------------------------------
    def stage_cost(self, shape: StepShape, layers: int, first: bool, last: bool, mtp_draft: int = 0) -> StepCost:
        cost = StepCost()
        ops, stats = self.layer_ops(shape)
        cost.load = stats
        for op in ops:
            cost.add(op, layers, self.overhead_s)
        for op in self.head_ops(shape, first, last):
            cost.add(op, 1, self.overhead_s)
        if last and mtp_draft:
            for op in self.mtp_ops(shape):
                cost.add(op, mtp_draft, self.overhead_s, prefix="mtp:")
        return cost

    def step_cost(self, shape: StepShape, mtp_draft: int = 0, prefill: bool = False) -> StepCost:
        """Time for every sequence of `shape` to advance by one forward, pipeline included.

        Decode with pp stages splits the batch into min(pp, seqs) micro-batches; a token passes
        all stages in turn, so the step is pp x the slowest (last) stage plus the sends.
        Prefill splits the tokens into pp chunks: (2 pp - 1) chunk-times of the last stage.
        """
        return self._pipeline_cost(shape, mtp_draft, prefill).finish(self.eff.host_us, self.exec_mode, self.overlap)

    def _pipeline_cost(self, shape: StepShape, mtp_draft: int, prefill: bool) -> StepCost:
        p, m = self.plan, self.model
        pp = p.pp
        layers = math.ceil(m.num_layers / pp)
        if pp == 1:
            return self.stage_cost(shape, layers, True, True, mtp_draft)
        d, fb = m.hidden_size, self.quant.float_bytes
        if prefill:
            last = self.stage_cost(shape, layers, False, True, mtp_draft)
            t_a = math.ceil(shape.seqs / p.attn_dp) * shape.tokens_per_seq
            send = self.comm("pipeline_p2p", "p2p", t_a * d * fb / pp, 2, 2 * p.stage_devices)
            cost = last.scale((2 * pp - 1) / pp)
            if send:
                cost.add(send, pp - 1, self.overhead_s)
            return cost
        micro = min(pp, shape.seqs)
        mb = StepShape(math.ceil(shape.seqs / micro), shape.tokens_per_seq, shape.context_len, shape.logits_per_seq)
        last = self.stage_cost(mb, layers, False, True, mtp_draft)
        t_a = math.ceil(mb.seqs / p.attn_dp) * mb.tokens_per_seq
        send = self.comm("pipeline_p2p", "p2p", t_a * d * fb, 2, 2 * p.stage_devices)
        cost = last.scale(pp)
        if send:
            cost.add(send, pp, self.overhead_s)
        return cost
