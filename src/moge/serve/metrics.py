"""Prometheus metrics of one server, in a registry of its own (several apps may live in one process).

The engine's gauges (queue, running batch, KV blocks) are read from `Engine.stats()` when scraped,
so they are never stale; counters and histograms are updated as requests progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from moge.inference.engine import Stats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineGauges(Collector):
    def __init__(self, stats: Callable[[], Stats]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("moge_num_requests_waiting", "Requests queued, not yet admitted", value=s.waiting)
        yield GaugeMetricFamily("moge_num_requests_running", "Requests in the running batch", value=s.running)
        yield GaugeMetricFamily("moge_kv_blocks_used", "KV cache blocks in use", value=s.kv_blocks_used)
        yield GaugeMetricFamily("moge_kv_blocks_total", "KV cache blocks in the pool", value=s.kv_blocks_total)
        yield GaugeMetricFamily("moge_decode_threads", "CPU threads the decode steps run with (tuned or fixed)",
                                value=s.threads)


class ServerMetrics:
    """The metrics of one server; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], Stats]):
        self.registry = r = CollectorRegistry()
        r.register(_EngineGauges(stats))
        self.ttft = Histogram("moge_time_to_first_token_seconds", "Time from arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("moge_time_per_output_token_seconds",
                              "Mean time between a finished request's tokens after the first", buckets=TPOT_BUCKETS,
                              registry=r)
        self.generation_tokens = Counter("moge_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("moge_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.requests = Counter("moge_requests", "Finished requests by finish reason (stop, length, abort, error)",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("moge_requests_rejected", "Requests refused before the engine, by HTTP status",
                                ["status"], registry=r)
        self.spec_drafted = Counter("moge_spec_decode_draft_tokens", "Speculative draft tokens proposed", registry=r)
        self.spec_accepted = Counter("moge_spec_decode_accepted_tokens", "Speculative draft tokens accepted",
                                     registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
