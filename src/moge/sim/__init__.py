"""Deployment simulator and architecture search for dense, top-K MoE and MoGE inference.

Modules, one concept each:
    hardware     device profiles read from hardware/*.json: peaks, links, kernel priors with ranges
    quant        bytes per weight / activation / KV element, GEMM dtype
    plans        per-module parallel plans (TP, DP, EP, PP, H2P) and their validation (the degree
                 rules are moge.degrees', the runtime's; InfeasiblePlan is what searches skip)
    collectives  alpha-beta cost of all-reduce, reduce-scatter, all-gather, all-to-all
    straggler    Monte Carlo of routing: the busiest expert-parallel device's load
    cost         operator-level cost of one forward step (rooflines + collectives)
    memory       weights, KV cache, workspace per device and the batch limit
    simulate     Scenario -> SimResult (TTFT, TPOT, throughput, memory, breakdown)
    calibration  the fit of three kernel factors, one per paper 800I A2 point; leave-one-out
    uncertainty  Monte Carlo of every prior's range: p10/p50/p90 and the most sensitive inputs
    search       best plan/batch under a latency bound; the paper's architecture search
    report       tables and charts
    cli          `moge simulate` and `moge search`
"""

from moge.sim.hardware import Efficiency, HardwareProfile, LinkLevel, list_hardware, load_hardware
from moge.sim.plans import InfeasiblePlan, ParallelPlan, plan_preset
from moge.sim.simulate import Scenario, SimResult, simulate

__all__ = ["Efficiency", "HardwareProfile", "InfeasiblePlan", "LinkLevel", "list_hardware", "load_hardware",
           "ParallelPlan",
           "plan_preset", "Scenario", "SimResult", "simulate"]
