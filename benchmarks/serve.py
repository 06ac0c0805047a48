"""Serving under load: OpenAI-API servers driven by one open-loop Poisson trace, side by side.

In the style of vLLM's serving benchmark. Each server is started here as a subprocess on
127.0.0.1 with a free port, waited for, driven by the same trace at every request rate, and
killed before the next one starts (never two at once):

    moge          `moge serve` (continuous batching) on a moge-small checkpoint, random weights, fp32
    static        `moge serve --batching static` on the same checkpoint (our static batching)
    transformers  `transformers serve --continuous-batching` on the same-size Qwen2-MoE with our
                  weights copied in (as benchmarks/generate.py)
    ep-moge       `torchrun --nproc-per-node 2 -m moge serve --parallel ep`, MoGE (grouped) router
    ep-topk       the same with the conventional top-K router (same weights, only routing differs)

The trace: prompts are random windows of the prepared corpus's validation documents (data/corpus,
made by `moge data prepare`), decoded to text with the corpus tokenizer; prompt and output lengths
are drawn from clipped log-normal distributions (`--prompt-len`, `--output-len` as
MEDIAN,SIGMA,MIN,MAX). The real document lengths are not used: they run from tens of tokens to tens
of thousands of tokens, beyond the model's context and this CPU's budget. Arrival gaps are
exponential (a Poisson process); one set of unit gaps is drawn from `--seed` and scaled by 1/rate,
so every server and every rate sees the same requests in the same order.

Every request is a streaming `/v1/completions` call made with the official `openai` client
(AsyncOpenAI), so TTFT and per-token times are taken at the client. `transformers serve` takes only
text prompts there and rejects fields outside the OpenAI schema, so the prompt is text for every
server; `ignore_eos` (vLLM's extension, in `extra_body`) goes to our servers only, and the peer's
checkpoint is saved without an eos id so it too produces exactly `max_tokens` tokens.

    .venv/bin/python -m moge data prepare
    .venv/bin/python benchmarks/serve.py --threads 2 --out serve.json
    .venv/bin/python benchmarks/serve.py --quick --threads 1 --servers moge     # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moge.errors import ConfigError

SERVERS = ("moge", "static", "transformers", "ep-moge", "ep-topk")
DEFAULT_TPOT_BOUND_MS = 100.0
READY_FILE = "READY"  # written last into a cached checkpoint directory


# ---------------------------------------------------------------------------------------------
# The trace
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """A clipped log-normal length: round(exp(N(ln median, sigma))) clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    @classmethod
    def parse(cls, field: str, spec: str) -> LengthDist:
        """`MEDIAN,SIGMA,MIN,MAX`, e.g. "128,0.7,16,512"; a ConfigError names `field` otherwise."""
        parts = spec.split(",")
        valid = "expected MEDIAN,SIGMA,MIN,MAX with 1 <= MIN <= MEDIAN <= MAX and SIGMA >= 0, e.g. 128,0.7,16,512"
        if len(parts) != 4:
            raise ConfigError(f"{field}={spec!r} is invalid: {valid}")
        try:
            median, sigma, low, high = float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            raise ConfigError(f"{field}={spec!r} is invalid: {valid}") from None
        if not (1 <= low <= median <= high and sigma >= 0 and math.isfinite(sigma)):
            raise ConfigError(f"{field}={spec!r} is invalid: {valid}")
        return cls(median, sigma, low, high)

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        raw = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=n)
        return [int(v) for v in np.clip(np.rint(raw), self.low, self.high)]


@dataclass(frozen=True)
class TraceRequest:
    index: int
    prompt: str
    prompt_tokens: int  # of `prompt` encoded again by the corpus tokenizer (what the servers see)
    output_tokens: int  # max_tokens of the request: its exact length with ignore_eos
    document: str  # "domain/name" of the source document, for the record


def unit_gaps(n: int, seed: int) -> np.ndarray:
    """n exponential gaps of mean 1: the arrival gaps at rate 1 (scale by 1/rate for another rate)."""
    return np.random.default_rng([seed, 1]).exponential(1.0, size=n)


def poisson_arrivals(gaps: np.ndarray, rate: float) -> list[float]:
    """Send times (s after the start) of a Poisson process with these unit gaps; rate inf = all at 0.
    The first request goes at time 0 (vLLM sends its first request at once too)."""
    if not rate > 0:
        raise ConfigError(f"rate={rate} is invalid: must be > 0 requests/s (inf sends everything at once)")
    if math.isinf(rate):
        return [0.0] * len(gaps)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])]) / rate if len(gaps) else np.zeros(0)
    return [float(t) for t in times]


def build_trace(documents: Sequence[tuple[str, Sequence[int]]], n: int, prompt_len: LengthDist,
                output_len: LengthDist, seed: int, decode, encode) -> list[TraceRequest]:
    """n requests: prompt = a random window of a random document long enough for the drawn length
    (the longest document bounds it), decoded to text. `decode(ids) -> str`, `encode(str) -> ids`."""
    if n < 1:
        raise ConfigError(f"num_requests={n} is invalid: must be >= 1")
    docs = [(name, np.asarray(ids)) for name, ids in documents if len(ids) > 0]
    if not docs:
        raise ConfigError("documents: the corpus has no non-empty validation documents to draw prompts from")
    rng = np.random.default_rng([seed, 0])
    prompts, outputs = prompt_len.sample(n, rng), output_len.sample(n, rng)
    longest = max(len(ids) for _, ids in docs)
    trace = []
    for i, (want, out) in enumerate(zip(prompts, outputs)):
        want = min(want, longest)
        fits = [d for d in docs if len(d[1]) >= want]
        name, ids = fits[int(rng.integers(len(fits)))]
        start = int(rng.integers(len(ids) - want + 1))
        text = decode([int(t) for t in ids[start:start + want]])
        trace.append(TraceRequest(i, text, len(encode(text)), out, name))
    return trace


def corpus_documents(corpus: Path) -> tuple[list[tuple[str, np.ndarray]], object]:
    """The validation documents' ids ("domain/name", ids) and the corpus tokenizer."""
    from moge.data.bpe import load_bpe
    from moge.data.shards import TokenShards

    shards = TokenShards(corpus)
    docs = []
    for d in shards.documents(split="val"):
        ids = shards.tokens("val", d["domain"])
        docs.append((f"{d['domain']}/{d['name']}", np.asarray(ids[d["offset"]:d["offset"] + d["tokens"]])))
    return docs, load_bpe(shards.tokenizer_path)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics (numpy's and
    vLLM's default); nan for no values."""
    if not 0 <= q <= 100:
        raise ConfigError(f"q={q} is invalid: a percentile is in 0..100")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tpot_s(first_token_s: float, last_token_s: float, output_tokens: int) -> float | None:
    """Time per output token after the first, as vLLM: (last - first) / (tokens - 1); None for 1 token."""
    if output_tokens < 2:
        return None
    return (last_token_s - first_token_s) / (output_tokens - 1)


@dataclass
class RequestResult:
    index: int
    ok: bool
    send_s: float = 0.0  # all times in s since the start of the run
    first_token_s: float | None = None
    last_token_s: float | None = None
    done_s: float | None = None
    output_tokens: int = 0
    chunks: int = 0
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.first_token_s is None or self.last_token_s is None:
            return None
        return tpot_s(self.first_token_s, self.last_token_s, self.output_tokens)


def summarize(results: Sequence[RequestResult], duration_s: float, tpot_bound_ms: float,
              ttft_bound_ms: float | None = None) -> dict:
    """Throughputs over the run's duration (first send to last completion), TTFT / TPOT percentiles
    in ms over the completed requests, and goodput: completed requests per second whose TPOT is within
    `tpot_bound_ms` (and TTFT within `ttft_bound_ms` when given; a 1-token request has no TPOT and
    counts on TTFT alone)."""
    done = [r for r in results if r.ok]
    ttfts = [1000 * r.ttft_s for r in done if r.ttft_s is not None]
    tpots = [1000 * t for r in done if (t := r.tpot_s) is not None]

    def good(r: RequestResult) -> bool:
        t = r.tpot_s
        if t is not None and 1000 * t > tpot_bound_ms:
            return False
        return ttft_bound_ms is None or (r.ttft_s is not None and 1000 * r.ttft_s <= ttft_bound_ms)

    dur = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in done)
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration_s,
        "request_throughput": len(done) / dur, "output_throughput": out_tokens / dur, "output_tokens": out_tokens,
        "ttft_ms": {"mean": statistics.fmean(ttfts) if ttfts else math.nan,
                    "p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)},
        "tpot_ms": {"mean": statistics.fmean(tpots) if tpots else math.nan,
                    "p50": percentile(tpots, 50), "p99": percentile(tpots, 99)},
        "goodput": sum(good(r) for r in done) / dur,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def best_under_bound(per_rate: dict[str, dict], tpot_bound_ms: float) -> dict | None:
    """The rate with the highest output throughput whose p99 TPOT is within the bound (nan: no)."""
    ok = [(rate, s) for rate, s in per_rate.items()
          if s["failed"] == 0 and s["tpot_ms"]["p99"] <= tpot_bound_ms]
    if not ok:
        return None
    rate, s = max(ok, key=lambda kv: kv[1]["output_throughput"])
    return {"rate": rate, "output_throughput": s["output_throughput"], "tpot_p99_ms": s["tpot_ms"]["p99"]}


# ---------------------------------------------------------------------------------------------
# The load generator
# ---------------------------------------------------------------------------------------------


async def _one(client, model: str, req: TraceRequest, send_s: float, t0: float, ignore_eos: bool,
               count_tokens, timeout_s: float) -> RequestResult:
    res = RequestResult(req.index, ok=False, send_s=send_s)
    extra = {"ignore_eos": True} if ignore_eos else None
    text, usage_tokens, finish = [], None, None
    try:
        stream = await client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.output_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra, timeout=timeout_s)
        async for chunk in stream:
            now = time.perf_counter() - t0
            problem = (getattr(chunk, "model_extra", None) or {}).get("error")
            if problem:  # an error event inside the stream (the status was already 200)
                raise RuntimeError(problem.get("message", problem) if isinstance(problem, dict) else problem)
            if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices or []:
                if choice.text:
                    res.chunks += 1
                    text.append(choice.text)
                    if res.first_token_s is None:
                        res.first_token_s = now
                    res.last_token_s = now
                if choice.finish_reason:
                    finish = choice.finish_reason
        res.done_s = time.perf_counter() - t0
        if usage_tokens is not None:
            res.output_tokens = usage_tokens
        elif finish == "length":
            res.output_tokens = req.output_tokens
        else:  # no usage: count the text's tokens (byte-level BPE: close, not always exact)
            res.output_tokens = count_tokens("".join(text))
        res.ok = res.first_token_s is not None
        if not res.ok:
            res.error = f"no text streamed (finish_reason={finish})"
    except Exception as e:  # a failed request is recorded, the run goes on
        res.done_s = time.perf_counter() - t0
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
    return res


async def run_load(base_url: str, model: str, trace: Sequence[TraceRequest], arrivals: Sequence[float],
                   ignore_eos: bool, count_tokens, timeout_s: float = 900.0) -> tuple[list[RequestResult], float]:
    """Open loop: request i is sent at arrivals[i] whatever happened to the others. Returns the
    results (in trace order) and the duration from the start to the last completion."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s) as client:
        t0 = time.perf_counter()
        tasks = []
        for req, at in zip(trace, arrivals):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                _one(client, model, req, time.perf_counter() - t0, t0, ignore_eos, count_tokens, timeout_s)))
        results = await asyncio.gather(*tasks)
    end = max((r.done_s for r in results if r.done_s is not None), default=0.0)
    return list(results), end


async def run_sequential(base_url: str, model: str, trace: Sequence[TraceRequest], ignore_eos: bool,
                         count_tokens, timeout_s: float = 900.0) -> list[RequestResult]:
    """One request at a time (the lowest load there is): warm-up and the TTFT probe."""
    from openai import AsyncOpenAI

    out = []
    async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout_s) as client:
        for req in trace:
            t0 = time.perf_counter()
            out.append(await _one(client, model, req, 0.0, t0, ignore_eos, count_tokens, timeout_s))
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _generate_module():
    """benchmarks/generate.py (its Qwen2-MoE peer builder), loaded by path: benchmarks is no package."""
    spec = importlib.util.spec_from_file_location("moge_bench_generate", Path(__file__).with_name("generate.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def model_config(preset: str, router: str, corpus: Path):
    """The preset with the corpus tokenizer's vocabulary and special ids (as training does)."""
    from moge.config import PRESETS
    from moge.data.shards import TokenShards

    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is invalid: choose one of {', '.join(PRESETS)}")
    shards = TokenShards(corpus)
    return PRESETS[preset].replace(vocab_size=shards.vocab_size, eos_token_id=shards.eos_id,
                                   pad_token_id=shards.pad_id, bos_token_id=shards.eos_id, router=router)


def build_model(cfg, seed: int):
    import torch

    from moge.nn.model import PanguProMoEForCausalLM

    torch.manual_seed(seed)
    return PanguProMoEForCausalLM(cfg).eval()


def _copy_tokenizer(corpus: Path, directory: Path) -> None:
    from moge.data.bpe import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        shutil.copyfile(corpus / name, directory / name)


def ensure_moge_checkpoint(work: Path, preset: str, router: str, corpus: Path, seed: int, log) -> Path:
    """A cached moge checkpoint (random weights from `seed`, fp32) with the corpus tokenizer. The
    grouped and top-K checkpoints hold the same weights: the router is the only difference."""
    from moge.checkpoint import save_pretrained

    directory = work / "checkpoints" / f"{preset}-{router}-seed{seed}"
    if (directory / READY_FILE).is_file():
        return directory
    log(f"writing {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained(build_model(model_config(preset, router, corpus), seed), directory, dtype="float32")
    _copy_tokenizer(corpus, directory)
    (directory / READY_FILE).write_text("ok\n")
    return directory


def ensure_hf_checkpoint(work: Path, preset: str, corpus: Path, seed: int, log) -> Path:
    """The same-size transformers Qwen2-MoE with our weights copied in (benchmarks/generate.py), no eos
    id in its generation config (it then stops at max_tokens only), and a PreTrainedTokenizerFast
    wrapping the corpus tokenizer.json. No experts implementation is saved: `transformers serve` loads
    with its default (grouped_mm where torch can run it, else eager)."""
    from transformers import PreTrainedTokenizerFast

    from moge.data.bpe import EOS_TOKEN, PAD_TOKEN, TOKENIZER_FILE

    directory = work / "checkpoints" / f"{preset}-qwen2moe-seed{seed}"
    if (directory / READY_FILE).is_file():
        return directory
    log(f"writing {directory}")
    gen = _generate_module()
    cfg = model_config(preset, "grouped", corpus)
    ours = build_model(cfg, seed)
    theirs = gen.build_theirs(cfg, "grouped_mm", seed)
    gen.copy_weights(ours, theirs)
    directory.mkdir(parents=True, exist_ok=True)
    theirs.save_pretrained(directory)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / TOKENIZER_FILE), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tok.save_pretrained(directory)
    (directory / READY_FILE).write_text("ok\n")
    return directory


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    model: str  # the `model` field of the requests
    ignore_eos: bool  # send ignore_eos in extra_body
    port: int
    checkpoint: Path
    note: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def server_spec(name: str, checkpoints: dict[str, Path], threads: int,
                moge_args: Sequence[str] = ()) -> ServerSpec:
    """The command line of one server. EP runs 2 ranks of max(1, threads // 2) threads each, so every
    server gets the same number of cores. `moge_args` go to every `moge serve` (engine flags)."""
    py = sys.executable
    port = free_port()
    common = ["--host", "127.0.0.1", "--port", str(port)]
    if name in ("moge", "static"):
        ckpt = checkpoints["grouped"]
        argv = [py, "-m", "moge", "serve", "--model", str(ckpt), "--served-model-name", ckpt.name, *common,
                "--threads", str(threads), "--log-level", "warning", *moge_args]
        if name == "static":
            argv += ["--batching", "static"]
        return ServerSpec(name, argv, thread_env(threads), ckpt.name, True, port, ckpt)
    if name == "transformers":
        ckpt = checkpoints["hf"]
        exe = str(Path(py).with_name("transformers"))
        argv = [exe, "serve", str(ckpt), "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                *common, "--log-level", "warning"]
        return ServerSpec(name, argv, thread_env(threads), str(ckpt), False, port, ckpt,
                          note="no ignore_eos field: its checkpoint has no eos id instead")
    if name in ("ep-moge", "ep-topk"):
        ckpt = checkpoints["grouped" if name == "ep-moge" else "topk"]
        per_rank = max(1, threads // 2)
        exe = str(Path(py).with_name("torchrun"))
        argv = [exe, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                "-m", "moge", "serve", "--model", str(ckpt), "--served-model-name", ckpt.name, *common,
                "--parallel", "ep", "--threads", str(per_rank), "--log-level", "warning", *moge_args]
        return ServerSpec(name, argv, thread_env(per_rank), ckpt.name, True, port, ckpt,
                          note=f"2 ranks x {per_rank} threads")
    raise ConfigError(f"servers: {name!r} is not a server: valid are {', '.join(SERVERS)}")


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_server(spec: ServerSpec, log_path: Path, timeout_s: float) -> subprocess.Popen:
    """Start the server in a session of its own (so it and its children can be stopped together)
    and wait until /health or /v1/models answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, env=spec.env, start_new_session=True)
    log.close()
    root = f"http://127.0.0.1:{spec.port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{spec.name} exited with {proc.returncode} before it was ready; log {log_path}:\n"
                               f"{_tail(log_path)}")
        if _get(root + "/health") == 200 or _get(root + "/v1/models") == 200:
            return proc
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{spec.name} did not answer within {timeout_s:.0f} s; log {log_path}:\n{_tail(log_path)}")


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's own process group (torchrun's ranks too), SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------
# Bare prefill (in-process) for the TTFT check
# ---------------------------------------------------------------------------------------------


def bare_prefill_ms(kind: str, checkpoint: Path, prompts: Sequence[list[int]], reps: int) -> list[float]:
    """Median wall time (ms) of one forward over each prompt (logits of the last position only),
    on the checkpoint the server loads, after one warm-up forward."""
    import torch

    if kind == "moge":
        from moge.checkpoint import load_pretrained
        from moge.nn.model import KVCache

        model = load_pretrained(checkpoint).eval()

        def forward(model, ids):
            cache = KVCache.allocate(model.config, 1, ids.shape[1] + 1, torch.float32)
            model(ids, cache=cache, logits_slice=slice(-1, None))
    else:
        from transformers import AutoModelForCausalLM, DynamicCache

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

        def forward(model, ids):
            model(ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    out = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            if i == 0:
                forward(model, ids)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                forward(model, ids)
                times.append(1000 * (time.perf_counter() - t0))
            out.append(statistics.median(times))
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def parse_rates(spec: str) -> list[float]:
    try:
        rates = [float(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or any(not r > 0 for r in rates):
        raise ConfigError(f"rates={spec!r} is invalid: expected comma-separated request rates > 0 per second "
                          f"(inf = all at once), e.g. 1,2,4,8")
    return rates


def parse_servers(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in SERVERS]
    if not names or bad:
        raise ConfigError(f"servers={spec!r} is invalid: choose from {', '.join(SERVERS)}")
    return list(dict.fromkeys(names))


def format_table(results: dict[str, dict]) -> str:
    head = ("| server | rate (req/s) | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | goodput "
            "(req/s) | failed |")
    lines = [head, "|" + "---|" * 8]
    for name, res in results.items():
        for rate, s in res.get("rates", {}).items():
            lines.append(f"| {name} | {rate} | {s['request_throughput']:.2f} | {s['output_throughput']:.1f} | "
                         f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f} | "
                         f"{s['tpot_ms']['p50']:.1f} / {s['tpot_ms']['p99']:.1f} | {s['goodput']:.2f} | "
                         f"{s['failed']} |")
    return "\n".join(lines)


def bench_server(spec: ServerSpec, trace: list[TraceRequest], gaps: np.ndarray, rates: list[float],
                 probe: list[TraceRequest], args, count_tokens, log) -> dict:
    out: dict = {"command": spec.argv, "note": spec.note, "ignore_eos": spec.ignore_eos, "rates": {}}
    t_start = time.perf_counter()
    proc = start_server(spec, args.work / "logs" / f"{spec.name}.log", args.startup_timeout)
    out["startup_s"] = time.perf_counter() - t_start
    log(f"{spec.name}: ready in {out['startup_s']:.1f} s on port {spec.port}")
    try:
        warm = asyncio.run(run_sequential(spec.base_url, spec.model, trace[:args.warmup], spec.ignore_eos,
                                          count_tokens))
        bad = [r.error for r in warm if not r.ok]
        if bad:
            raise RuntimeError(f"{spec.name}: warm-up request failed: {bad[0]}")
        lengths = [(r.output_tokens, q.output_tokens) for r, q in zip(warm, trace)]
        out["warmup_lengths"] = lengths
        if any(got != want for got, want in lengths):
            log(f"{spec.name}: warm-up output lengths (got, asked) {lengths}: outputs are not exact")
        if probe:
            res = asyncio.run(run_sequential(spec.base_url, spec.model, probe, spec.ignore_eos, count_tokens))
            out["ttft_probe_ms"] = [None if r.ttft_s is None else 1000 * r.ttft_s for r in res]
        for rate in rates:
            arrivals = poisson_arrivals(gaps, rate)
            results, duration = asyncio.run(run_load(spec.base_url, spec.model, trace, arrivals, spec.ignore_eos,
                                                     count_tokens))
            s = summarize(results, duration, args.tpot_bound_ms, args.ttft_bound_ms)
            out["rates"][str(rate)] = s
            out.setdefault("requests", {})[str(rate)] = [
                {"send_s": r.send_s, "ttft_ms": None if r.ttft_s is None else 1000 * r.ttft_s,
                 "tpot_ms": None if r.tpot_s is None else 1000 * r.tpot_s, "output_tokens": r.output_tokens,
                 "error": r.error} for r in results]
            log(f"{spec.name} @ {rate} req/s: {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} "
                f"tok/s, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, TPOT p99 {s['tpot_ms']['p99']:.1f} ms, "
                f"{s['failed']} failed" + (f" ({s['errors'][0]})" if s["errors"] else ""))
    finally:
        stop_server(proc)
    out["best_under_bound"] = best_under_bound(out["rates"], args.tpot_bound_ms)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {', '.join(SERVERS)}")
    p.add_argument("--rates", default="1,2,4,8", help="request rates (req/s) of the Poisson arrivals")
    p.add_argument("--num-requests", type=int, default=64, help="requests per rate")
    p.add_argument("--prompt-len", default="128,0.7,16,512", help="prompt tokens: MEDIAN,SIGMA,MIN,MAX (log-normal)")
    p.add_argument("--output-len", default="64,0.7,8,256", help="output tokens: MEDIAN,SIGMA,MIN,MAX (log-normal)")
    p.add_argument("--seed", type=int, default=0, help="the trace and the random weights")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server (EP: split over 2 ranks)")
    p.add_argument("--moge-args", default="", help="extra flags for every `moge serve`, e.g. '--step-tokens 64'")
    p.add_argument("--tpot-bound-ms", type=float, default=DEFAULT_TPOT_BOUND_MS,
                   help="p99 TPOT bound of the best-throughput report and of goodput")
    p.add_argument("--ttft-bound-ms", type=float, default=None, help="also require TTFT within this for goodput")
    p.add_argument("--ttft-probe", type=int, default=8, help="requests of the one-at-a-time TTFT vs prefill probe")
    p.add_argument("--prefill-reps", type=int, default=5, help="bare prefill repetitions per probe prompt")
    p.add_argument("--warmup", type=int, default=2, help="sequential warm-up requests after startup")
    p.add_argument("--preset", default="moge-small")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--work", type=Path, default=Path("runs/serve-bench"), help="checkpoints and server logs")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 8 requests at one rate, tiny prompts and outputs, 2 probe requests")
    p.add_argument("--out", type=Path, help="write the JSON results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.num_requests, args.prompt_len, args.output_len = "4", 8, "16,0.3,8,32", "8,0.3,4,16"
        args.ttft_probe, args.prefill_reps, args.warmup = 2, 3, 1
    servers, rates = parse_servers(args.servers), parse_rates(args.rates)
    prompt_len, output_len = LengthDist.parse("prompt_len", args.prompt_len), LengthDist.parse("output_len",
                                                                                               args.output_len)
    if args.threads < 1:
        raise ConfigError(f"threads={args.threads} is invalid: must be >= 1")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    import torch

    torch.set_num_threads(args.threads)

    docs, tok = corpus_documents(args.corpus)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    def count_tokens(text: str) -> int:
        return len(encode(text))

    trace = build_trace(docs, args.num_requests, prompt_len, output_len, args.seed, decode, encode)
    gaps = unit_gaps(args.num_requests, args.seed)
    probe_trace = [dataclasses.replace(r, index=-1 - i, output_tokens=2) for i, r in enumerate(trace[:args.ttft_probe])]
    pl, ol = [r.prompt_tokens for r in trace], [r.output_tokens for r in trace]
    log(f"trace: {len(trace)} requests from {len(docs)} validation documents, prompt tokens median "
        f"{statistics.median(pl):.0f} (min {min(pl)}, max {max(pl)}), output tokens median "
        f"{statistics.median(ol):.0f} (min {min(ol)}, max {max(ol)}), rates {rates} req/s, seed {args.seed}")

    checkpoints: dict[str, Path] = {}
    if {"moge", "static", "ep-moge"} & set(servers):
        checkpoints["grouped"] = ensure_moge_checkpoint(args.work, args.preset, "grouped", args.corpus, args.seed, log)
    if "ep-topk" in servers:
        checkpoints["topk"] = ensure_moge_checkpoint(args.work, args.preset, "topk", args.corpus, args.seed, log)
    if "transformers" in servers:
        checkpoints["hf"] = ensure_hf_checkpoint(args.work, args.preset, args.corpus, args.seed, log)

    # Bare prefill of the probe prompts, in this process while no server runs.
    probe_ids = [encode(r.prompt) for r in probe_trace]
    prefill: dict[str, list[float]] = {}
    if probe_trace:
        if {"moge", "static"} & set(servers):
            prefill["moge"] = bare_prefill_ms("moge", checkpoints["grouped"], probe_ids, args.prefill_reps)
        if "transformers" in servers:
            prefill["transformers"] = bare_prefill_ms("hf", checkpoints["hf"], probe_ids, args.prefill_reps)

    results: dict[str, dict] = {}
    for name in servers:
        spec = server_spec(name, checkpoints, args.threads, shlex.split(args.moge_args))
        try:
            res = bench_server(spec, trace, gaps, rates, probe_trace, args, count_tokens, log)
        except Exception as e:  # one server failing leaves the others' results
            log(f"{name}: FAILED: {e}")
            results[name] = {"command": spec.argv, "error": str(e), "rates": {}}
            continue
        bare = prefill.get("moge" if name in ("moge", "static") else name)
        if bare and res.get("ttft_probe_ms") and None not in res["ttft_probe_ms"]:
            ratios = [t / b for t, b in zip(res["ttft_probe_ms"], bare)]
            res["ttft_vs_prefill"] = {"bare_prefill_ms": bare, "ratio_median": statistics.median(ratios),
                                      "ratio_max": max(ratios), "prompt_tokens": [len(i) for i in probe_ids]}
        results[name] = res

    print()
    print(format_table(results))
    print(f"\nbest output throughput with p99 TPOT <= {args.tpot_bound_ms:.0f} ms:")
    for name, res in results.items():
        best = res.get("best_under_bound")
        print(f"  {name:13s} " + (f"{best['output_throughput']:.1f} tok/s at {best['rate']} req/s "
                                  f"(p99 TPOT {best['tpot_p99_ms']:.1f} ms)" if best else "none within the bound"))
    print("\nTTFT at low load (one request at a time) / bare prefill of the same prompt (target <= 1.5x):")
    for name, res in results.items():
        tv = res.get("ttft_vs_prefill")
        if tv:
            print(f"  {name:13s} median {tv['ratio_median']:.2f}x, max {tv['ratio_max']:.2f}x "
                  f"(TTFT {statistics.median(res['ttft_probe_ms']):.1f} ms, prefill "
                  f"{statistics.median(tv['bare_prefill_ms']):.1f} ms)")

    if args.out:
        record = {"servers": servers, "rates": rates, "num_requests": args.num_requests, "seed": args.seed,
                  "threads": args.threads, "preset": args.preset, "tpot_bound_ms": args.tpot_bound_ms,
                  "ttft_bound_ms": args.ttft_bound_ms, "prompt_len": dataclasses.asdict(prompt_len),
                  "output_len": dataclasses.asdict(output_len), "quick": args.quick,
                  "trace": {"prompt_tokens": pl, "output_tokens": ol, "unit_gaps": [float(g) for g in gaps]},
                  "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                              "python": platform.python_version()},
                  "results": results}
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
