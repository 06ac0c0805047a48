"""Operator-level cost of one forward step on the busiest device of a pipeline stage.

Every operator is costed by one of two rules:

    roofline    t = max(FLOPs / (peak[dtype] * eff.compute), bytes / (mem_bw * eff.memory))
    collective  t = alpha-beta cost on the interconnect level its group spans (collectives.py)

plus a fixed `eff.op_overhead_us` per launched kernel, reported on its own line ("overhead").
Nothing overlaps: the step time is the plain sum (a known pessimism, see docs/simulator.md).

One decoder layer is built once per step shape and multiplied by the layers of a stage. The
routed-expert GEMM reads only the experts that received tokens and computes the busiest
device's assignments (straggler.py); under attention DP the busiest DP rank holds
ceil(sequences / attn_dp) sequences.
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


@dataclass
class StepCost:
    """Per-operator times (seconds, summed over the layers of a stage) and their total."""

    ops: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Op] = field(default_factory=dict)
    load: LoadStats | None = None
    traffic: dict[str, float] = field(default_factory=dict)  # bytes per step: weights, kv_cache, collectives

    def add(self, op: Op, times: float = 1.0, overhead_s: float = 0.0, prefix: str = "") -> None:
        key = prefix + op.name
        self.ops[key] = self.ops.get(key, 0.0) + op.time_s * times
        self.ops["overhead"] = self.ops.get("overhead", 0.0) + op.launches * overhead_s * times
        for kind, b in (("weights", op.weight_bytes), ("kv_cache", op.kv_bytes),
                        ("collectives", op.bytes if op.bound == "link" else 0.0)):
            self.traffic[kind] = self.traffic.get(kind, 0.0) + b * times
        if key not in self.detail:
            self.detail[key] = op

    def scale(self, factor: float) -> "StepCost":
        return StepCost({k: v * factor for k, v in self.ops.items()}, dict(self.detail), self.load,
                        {k: v * factor for k, v in self.traffic.items()})

    @property
    def total_s(self) -> float:
        return sum(self.ops.values())


class CostModel:
    """Builds and costs the operators of a model under one plan, quantization and routing model."""

    def __init__(self, model: ModelConfig, hardware: HardwareProfile, plan: ParallelPlan, quant: QuantScheme,
                 routing: RoutingModel | None):
        self.model, self.hw, self.plan, self.quant, self.routing = model, hardware, plan, quant, routing
        self.eff = hardware.efficiency
        self.overhead_s = self.eff.op_overhead_us * 1e-6

    # ---- primitive costs --------------------------------------------------------------------
    def roofline(self, name: str, flops: float, nbytes: float, dtype: str, launches: int = 1) -> Op:
        t_c = flops / (self.hw.peak_flops(dtype) * self.eff.compute) if flops else 0.0
        t_m = nbytes / (self.hw.memory_Bps * self.eff.memory)
        return Op(name, max(t_c, t_m), flops, nbytes, launches, "compute" if t_c > t_m else "memory")

    def gemm(self, name: str, m: float, k: float, n: float, w_bytes: float, in_bytes: float, out_bytes: float,
             dtype: str) -> Op:
        """[m, k] x [k, n]: weights read once, activations in and out."""
        op = self.roofline(name, 2.0 * m * k * n, k * n * w_bytes + m * k * in_bytes + m * n * out_bytes, dtype)
        op.weight_bytes = k * n * w_bytes
        return op

    def swiglu(self, name: str, tokens: float, width: float, weight_experts: float) -> Op:
        """gate/up/down of a SwiGLU MLP over `tokens` rows, reading `weight_experts` weight sets."""
        d, q = self.model.hidden_size, self.quant
        flops = 2.0 * 3 * d * width * tokens
        weights = weight_experts * 3 * d * width * q.weight_bytes
        nbytes = weights + tokens * (d * q.act_bytes + 2 * width * q.float_bytes + width * q.act_bytes
                                     + d * q.float_bytes)
        op = self.roofline(name, flops, nbytes, q.gemm_dtype, launches=3)
        op.weight_bytes = weights
        return op

    def elementwise(self, name: str, nbytes: float, launches: int = 1) -> Op:
        return Op(name, nbytes / (self.hw.memory_Bps * self.eff.memory), 0.0, nbytes, launches, "memory")

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
        attn = self.roofline("attention", attn_flops, kv_read + t_a * h_loc * hd * 2 * fb, q.float_dtype, launches=2)
        attn.kv_bytes = kv_read
        ops.append(attn)
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
        router.time_s += router_tokens * n * 4 * 2 / (self.hw.memory_Bps * self.eff.memory)  # softmax + top-k
        router.launches = 2
        ops.append(router)
        if alltoall and ep > 1:
            remote = stats.devices_per_token * (1 - 1 / ep) * stats.straggler_factor
            ops.append(self.comm("moe_dispatch_all_to_all", "all_to_all", router_tokens * remote * d * ab,
                                 ep, p.stage_devices))
        load = stats.max_load
        ops.append(self.elementwise("expert_permute", (routed_tokens + load) * d * (ab + fb), launches=2))
        width = m.expert_intermediate_size / p.expert_tp
        ops.append(self.swiglu("routed_experts", load, width, stats.max_active_experts))
        if alltoall and ep > 1:
            remote = stats.devices_per_token * (1 - 1 / ep) * stats.straggler_factor
            ops.append(self.comm("moe_combine_all_to_all", "all_to_all", router_tokens * remote * d * fb,
                                 ep, p.stage_devices))
        return stats

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
