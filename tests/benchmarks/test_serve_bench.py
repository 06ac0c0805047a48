"""The pure parts of the serving load benchmark (benchmarks/serve.py): the trace, the Poisson
arrivals, the statistics and the client-side measurement of one streamed request."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moge.errors import ConfigError

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"
_spec = importlib.util.spec_from_file_location("moge_bench_serve", _PATH)
sb = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sb  # dataclasses look their module up while the class is built
_spec.loader.exec_module(sb)


# ---- lengths and the trace -------------------------------------------------------------------


def test_length_spec_parses_and_rejects_bad_input():
    assert sb.LengthDist.parse("prompt_len", "128,0.7,16,512") == sb.LengthDist(128.0, 0.7, 16, 512)
    for bad in ("128,0.7,16", "a,0.7,16,512", "128,-1,16,512", "8,0.7,16,512", "600,0.7,16,512",
                "128,0.7,0,512", "128,nan,16,512"):
        with pytest.raises(ConfigError, match="output_len"):
            sb.LengthDist.parse("output_len", bad)


def test_lengths_are_a_rounded_clipped_lognormal():
    dist = sb.LengthDist(100.0, 0.8, 40, 300)
    got = dist.sample(500, np.random.default_rng(3))
    normal = np.random.default_rng(3).normal(math.log(100.0), 0.8, size=500)  # lognormal = exp(normal)
    want = [min(300, max(40, round(math.exp(z)))) for z in normal]
    assert got == want
    assert min(got) == 40 and max(got) == 300  # both clips are hit at this sigma


def test_lengths_median_matches_the_parameter():
    got = sb.LengthDist(64.0, 0.5, 1, 10**6).sample(20001, np.random.default_rng(0))
    assert abs(float(np.median(got)) - 64) <= 2  # the median of exp(N(ln m, s)) is m
    assert sb.LengthDist(64.0, 0.0, 1, 100).sample(5, np.random.default_rng(0)) == [64] * 5


def _chars(ids):
    return "".join(chr(i) for i in ids)


def _ords(text):
    return [ord(c) for c in text]


def _docs():
    rng = np.random.default_rng(7)
    return [(f"d/{i}", rng.integers(97, 123, size=n)) for i, n in enumerate((30, 200, 1000, 0))]


def test_trace_prompts_are_windows_of_documents_with_the_drawn_lengths():
    docs = _docs()
    prompt, output = sb.LengthDist(50, 1.0, 5, 5000), sb.LengthDist(20, 0.5, 4, 64)
    trace = sb.build_trace(docs, 60, prompt, output, seed=11, decode=_chars, encode=_ords)
    rng = np.random.default_rng([11, 0])  # the trace's own draws, in its order
    want_prompt, want_output = prompt.sample(60, rng), output.sample(60, rng)
    texts = {name: _chars(ids) for name, ids in docs}
    assert [r.index for r in trace] == list(range(60))
    for r, wp, wo in zip(trace, want_prompt, want_output):
        assert r.prompt_tokens == len(r.prompt) == min(wp, 1000)  # the longest document bounds a prompt
        assert r.prompt in texts[r.document]
        assert r.output_tokens == wo
    assert len({r.document for r in trace}) > 1
    assert sum(not texts[r.document].startswith(r.prompt) for r in trace) > 30  # random starts, not prefixes


def test_trace_is_a_function_of_the_seed():
    docs = _docs()
    args = (docs, 20, sb.LengthDist(50, 0.7, 5, 500), sb.LengthDist(20, 0.5, 4, 64))
    a = sb.build_trace(*args, seed=1, decode=_chars, encode=_ords)
    assert a == sb.build_trace(*args, seed=1, decode=_chars, encode=_ords)
    assert a != sb.build_trace(*args, seed=2, decode=_chars, encode=_ords)


def test_trace_rejects_no_documents_and_no_requests():
    dist = sb.LengthDist(5, 0.1, 1, 10)
    with pytest.raises(ConfigError, match="documents"):
        sb.build_trace([("d/0", np.zeros(0, dtype=np.int64))], 3, dist, dist, 0, _chars, _ords)
    with pytest.raises(ConfigError, match="num_requests"):
        sb.build_trace(_docs(), 0, dist, dist, 0, _chars, _ords)


def test_trace_from_a_prepared_corpus(corpus):
    docs, tok = sb.corpus_documents(corpus / "data")
    assert docs and all(len(ids) > 0 for _, ids in docs)

    def encode(text):
        return tok.encode(text, add_special_tokens=False).ids

    trace = sb.build_trace(docs, 10, sb.LengthDist(20, 0.3, 8, 40), sb.LengthDist(8, 0.3, 4, 16), 0,
                           lambda ids: tok.decode(ids, skip_special_tokens=False), encode)
    for r in trace:
        assert "<|endoftext|>" not in r.prompt  # a window never leaves its document
        assert r.prompt_tokens == len(encode(r.prompt)) > 0


# ---- arrivals --------------------------------------------------------------------------------


def test_arrivals_are_the_cumulated_gaps_over_the_rate():
    gaps = sb.unit_gaps(5, seed=4)
    assert np.array_equal(gaps, sb.unit_gaps(5, seed=4)) and not np.array_equal(gaps, sb.unit_gaps(5, seed=5))
    at2 = sb.poisson_arrivals(gaps, 2.0)
    want = [0.0, gaps[1] / 2, (gaps[1] + gaps[2]) / 2, (gaps[1] + gaps[2] + gaps[3]) / 2, sum(gaps[1:]) / 2]
    assert at2 == pytest.approx(want, rel=1e-12)
    assert sb.poisson_arrivals(gaps, 8.0) == pytest.approx([t / 4 for t in at2], rel=1e-12)
    assert sb.poisson_arrivals(gaps, math.inf) == [0.0] * 5


def test_arrivals_form_a_poisson_process():
    rate, n = 4.0, 40000
    at = np.asarray(sb.poisson_arrivals(sb.unit_gaps(n, seed=0), rate))
    gaps = np.diff(at)
    assert np.all(gaps >= 0)
    assert abs(gaps.mean() * rate - 1) < 0.03  # mean gap 1/rate
    assert abs((gaps > 1 / rate).mean() - math.exp(-1)) < 0.01  # exponential: P(gap > mean) = 1/e
    counts = np.bincount(at.astype(int))[:-1]  # arrivals per whole second
    assert abs(counts.var() / counts.mean() - 1) < 0.15  # Poisson counts: variance = mean


def test_arrivals_reject_a_bad_rate():
    for rate in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="rate"):
            sb.poisson_arrivals(sb.unit_gaps(3, 0), rate)
    with pytest.raises(ConfigError, match="rates"):
        sb.parse_rates("1,0")
    assert sb.parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ConfigError, match="servers"):
        sb.parse_servers("moge,vllm")
    assert sb.parse_servers("static,moge,static") == ["static", "moge"]


# ---- statistics ------------------------------------------------------------------------------


def test_percentile_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert sb.percentile(xs, 50) == 2.5  # halfway between the 2nd and 3rd of 1, 2, 3, 4
    assert sb.percentile(xs, 99) == pytest.approx(3.97)  # position 0.99 * 3 = 2.97
    assert sb.percentile(xs, 0) == 1.0 and sb.percentile(xs, 100) == 4.0
    assert sb.percentile([7.0], 99) == 7.0
    assert math.isnan(sb.percentile([], 50))
    with pytest.raises(ConfigError, match="q="):
        sb.percentile(xs, 101)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy(xs, q):
    assert sb.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_tpot_by_hand():
    assert sb.tpot_s(1.0, 2.0, 11) == pytest.approx(0.1)  # 10 gaps after the first token
    assert sb.tpot_s(1.0, 1.0, 1) is None


def _result(i, send, first, last, tokens, ok=True):
    return sb.RequestResult(i, ok, send_s=send, first_token_s=first, last_token_s=last, done_s=last,
                            output_tokens=tokens, error=None if ok else "boom")


def test_summary_by_hand():
    results = [
        _result(0, 0.0, 0.1, 1.1, 11),  # TTFT 100 ms, TPOT 100 ms
        _result(1, 0.5, 0.8, 1.3, 6),  # TTFT 300 ms, TPOT 100 ms
        _result(2, 1.0, 1.2, 3.2, 5),  # TTFT 200 ms, TPOT 500 ms
        _result(3, 1.5, 1.9, 1.9, 1),  # TTFT 400 ms, no TPOT (one token)
        _result(4, 2.0, None, None, 0, ok=False),
    ]
    s = sb.summarize(results, duration_s=4.0, tpot_bound_ms=150)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (4, 1, 23)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 23 / 4
    assert s["ttft_ms"]["p50"] == pytest.approx(250)  # 100, 200, 300, 400
    assert s["ttft_ms"]["p99"] == pytest.approx(397)  # 300 + 0.97 * 100
    assert s["tpot_ms"]["p50"] == pytest.approx(100)  # 100, 100, 500
    assert s["tpot_ms"]["p99"] == pytest.approx(492)  # 100 + 0.98 * 400
    assert s["tpot_ms"]["mean"] == pytest.approx(700 / 3)
    assert s["goodput"] == 3 / 4  # requests 0, 1 and 3 (TTFT only) are within the bound
    assert s["errors"] == ["boom"]
    assert sb.summarize(results, 4.0, tpot_bound_ms=150, ttft_bound_ms=250)["goodput"] == 1 / 4  # request 0


def test_best_under_bound_takes_the_highest_throughput_within_the_bound():
    def rate(tput, p99, failed=0):
        return {"output_throughput": tput, "tpot_ms": {"p99": p99}, "failed": failed}

    per_rate = {"1": rate(10, 40), "2": rate(19, 90), "4": rate(30, 160), "8": rate(25, 95, failed=2)}
    assert sb.best_under_bound(per_rate, 100) == {"rate": "2", "output_throughput": 19, "tpot_p99_ms": 90}
    assert sb.best_under_bound(per_rate, 200)["rate"] == "4"
    assert sb.best_under_bound(per_rate, 30) is None


# ---- one streamed request, measured at the client -------------------------------------------


class _FakeClient:
    """An AsyncOpenAI stand-in: completions.create(stream=True) yields the given chunks."""

    def __init__(self, chunks, fail=None):
        self.chunks, self.fail, self.calls = chunks, fail, []
        self.completions = SimpleNamespace(create=self._create)

    async def _create(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail:
            raise self.fail

        async def stream():
            for c in self.chunks:
                await asyncio.sleep(0.002)
                yield c

        return stream()


def _chunk(text=None, finish=None, usage=None):
    choices = [] if text is None else [SimpleNamespace(text=text, finish_reason=finish)]
    return SimpleNamespace(choices=choices, usage=None if usage is None else SimpleNamespace(completion_tokens=usage),
                           model_extra={})


def _run_one(client, output_tokens=4, ignore_eos=True):
    req = sb.TraceRequest(0, "hello", 1, output_tokens, "d/0")
    return asyncio.run(sb._one(client, "m", req, 0.0, 0.0, ignore_eos, lambda t: len(t.split()), 60.0))


def test_one_request_takes_tokens_from_usage_and_times_from_text_chunks():
    client = _FakeClient([_chunk(" a"), _chunk(""), _chunk(" b"), _chunk(" c d"), _chunk("", "length"),
                          _chunk(None, usage=4)])
    r = _run_one(client)
    assert r.ok and r.output_tokens == 4 and r.chunks == 3
    assert 0 < r.first_token_s < r.last_token_s <= r.done_s
    assert r.tpot_s == pytest.approx((r.last_token_s - r.first_token_s) / 3)
    call = client.calls[0]
    assert call["stream"] and call["max_tokens"] == 4 and call["extra_body"] == {"ignore_eos": True}
    _run_one(client, ignore_eos=False)
    assert client.calls[1]["extra_body"] is None  # servers that reject the field do not get it


def test_one_request_without_usage_falls_back_to_the_length_or_the_text():
    assert _run_one(_FakeClient([_chunk(" a"), _chunk(" b", "length")]), output_tokens=7).output_tokens == 7
    assert _run_one(_FakeClient([_chunk(" a b"), _chunk(" c", "stop")]), output_tokens=7).output_tokens == 3


def test_one_request_records_failures():
    r = _run_one(_FakeClient([], fail=ConnectionError("refused")))
    assert not r.ok and "refused" in r.error and r.tpot_s is None
    bad = SimpleNamespace(choices=[], usage=None, model_extra={"error": {"message": "engine died"}})
    r = _run_one(_FakeClient([_chunk(" a"), bad]))
    assert not r.ok and "engine died" in r.error
    r = _run_one(_FakeClient([_chunk("", "stop")]))
    assert not r.ok and "no text" in r.error
