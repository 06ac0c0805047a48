"""The application in-process (FastAPI's TestClient, real engine): speculative decoding's metrics, a
request that fails inside the engine, and an engine thread that dies."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from models import make_model, tiny_config
from prometheus_client.parser import text_string_to_metric_families

from moge.inference.engine import Engine, EngineConfig, Output
from moge.inference.generate import generate
from moge.serve.app import build_app
from moge.serve.runner import EngineRunner

CONFIG = EngineConfig(kv_blocks=64, block_size=8, max_running=4, step_tokens=32)


def _client(model, config=CONFIG, patch=None) -> TestClient:
    engine = Engine(model, config)
    if patch is not None:
        patch(engine)
    return TestClient(build_app(EngineRunner(engine), None, model_name="m"))


def _metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_speculative_engine_counts_drafts_and_keeps_greedy_output():
    torch.set_num_threads(1)
    model = make_model(tiny_config(num_mtp_modules=1, max_position_embeddings=64))
    prompt = [1, 5, 9, 13, 2, 7]
    expected = generate(model, [prompt], max_new_tokens=12, stop_ids=[]).tokens[0]
    with _client(model, EngineConfig(kv_blocks=64, block_size=8, speculative=True)) as client:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                 "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected
        assert r.json()["choices"][0]["text"] == ""  # no tokenizer: ids only
        m = _metrics(client)
    assert m["moge_spec_decode_draft_tokens_total"] > 0
    assert 0 <= m["moge_spec_decode_accepted_tokens_total"] <= m["moge_spec_decode_draft_tokens_total"]
    assert m["moge_generation_tokens_total"] == 12


def _fail_last_output(engine):
    """The engine reports an error as a request's last output (what it does when its forward fails)."""
    step = engine.step

    def failing() -> list[Output]:
        return [Output(o.request_id, [], "error", "RuntimeError: boom") if o.finished else o for o in step()]

    engine.step = failing


def test_an_engine_error_is_a_500_or_an_error_event():
    with _client(make_model(), patch=_fail_last_output) as client:
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]" and "boom" in json.loads(events[-2])["error"]["message"]
        assert all("choices" in json.loads(e) for e in events[:-2])
        assert client.get("/health").status_code == 200  # one request failed; the server goes on


def test_a_dead_engine_thread_makes_the_server_unhealthy():
    def crash(engine):
        def step():
            raise RuntimeError("engine bug")
        engine.step = step

    with _client(make_model(), patch=crash) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 500 and "engine bug" in r.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "engine bug" in health.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 503


@pytest.mark.parametrize("path", ["/nowhere", "/v1/completions"])
def test_unknown_routes_and_methods_use_the_error_object(path):
    with _client(make_model()) as client:
        r = client.get(path)
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_an_idle_distributed_runner_keeps_the_followers_alive():
    """The followers of a distributed engine wait in a collective with a timeout: when idle, the runner
    calls Engine.keepalive at least every keepalive_s (and never while it steps)."""
    import time

    engine = Engine(make_model(), CONFIG)
    calls = []
    engine.keepalive = lambda: calls.append(time.monotonic())
    runner = EngineRunner(engine, keepalive_s=0.1)
    runner.start()
    try:
        time.sleep(1.2)
    finally:
        runner.close()
    assert len(calls) >= 3 and all(b - a > 0.1 for a, b in zip(calls, calls[1:]))
