"""`moge serve`: an OpenAI-compatible HTTP server (moge.serve) for a checkpoint, one process or torchrun."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from moge.commands.model import _threads
from moge.errors import ConfigError, DistributedError, MissingFileError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over HTTP with the OpenAI API (completions, chat, streaming)",
        description="Loads a checkpoint directory and serves /v1/completions, /v1/chat/completions, /v1/models, "
                    "/health and /metrics (Prometheus) with continuous batching over a paged KV cache. Binds to "
                    "127.0.0.1 unless --host says otherwise. Under torchrun (`torchrun --nproc-per-node N -m moge "
                    "serve ...`) the model is split over the N processes (--parallel ep|h2p); rank 0 serves HTTP "
                    "and the other ranks step in lockstep with it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory in the released layout (float or W8A8)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port; the line printed says which)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and see (default: the checkpoint directory's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $MOGE_API_KEY; "
                        "unset = no key)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request bodies beyond this get 413")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="uvicorn's log level")
    e = p.add_argument_group("engine")
    e.add_argument("--kv-blocks", type=int, default=1024, help="KV cache blocks in the pool (all requests together)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    e.add_argument("--max-running", type=int, default=32, help="requests in the running batch at once")
    e.add_argument("--step-tokens", type=int, default=256, help="token budget of one step (decodes + prefill chunks)")
    e.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond the batch; more get 429")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + max_tokens at most (default: the model's max_position_embeddings)")
    e.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="static = admit only into an empty batch (a baseline for benchmarks)")
    e.add_argument("--speculative", action="store_true", help="MTP speculative decoding (one draft token per step)")
    m = p.add_argument_group("placement (as `moge generate`)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype the weights are loaded in (default: the checkpoint's, config.json torch_dtype)")
    m.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N; auto = the GPU (under torchrun: the local rank's) when CUDA is present, "
                        "else cpu")
    m.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads; auto (default) times decode steps at 1, 2, 4, ... threads up to the "
                        "usable cores, runs the fastest and re-checks as the machine's load changes "
                        "(gauge moge_decode_threads)")
    m.add_argument("--parallel", choices=["ep", "h2p"], default="ep",
                   help="under torchrun: experts split over all ranks, or the H2P hybrid layout")
    m.add_argument("--attn-tp", type=int, default=1, help="--parallel h2p: attention tensor-parallel size")
    m.add_argument("--expert-tp", type=int, default=1, help="--parallel h2p: routed-expert tensor-parallel size")
    m.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun: seconds a collective waits for the other ranks before failing")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun job: rank 0 serves, the others follow its engine."""
    import torch

    from moge.commands.model import _load
    from moge.parallel.launch import (init_distributed, launched_by_torchrun, peer_failures_as_errors,
                                      resolve_device, shutdown)

    config = _engine_config(args)
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes={args.max_body_bytes} is invalid: must be a positive byte count")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port} is invalid: must be in 0..65535")
    if args.threads != "auto":
        torch.set_num_threads(args.threads)
    if not launched_by_torchrun():
        return _serve(args, _load(args, None), config, distributed=False)
    import torch.distributed as dist

    from moge.inference.engine import follow

    init_distributed(args.dist_timeout, device=resolve_device(args.device))
    try:
        with peer_failures_as_errors(args.dist_timeout):
            model = _load(args, args.parallel)
            if dist.get_rank() != 0:
                follow(model, config)  # until rank 0's engine closes
                return 0
            return _serve(args, model, config, distributed=True)
    except DistributedError as e:
        print(f"moge serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()


def _engine_config(args: argparse.Namespace):
    from moge.inference.engine import EngineConfig

    return EngineConfig(kv_blocks=args.kv_blocks, block_size=args.block_size, max_running=args.max_running,
                        step_tokens=args.step_tokens, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
                        static=args.batching == "static", speculative=args.speculative)


def _serve(args: argparse.Namespace, model, config, *, distributed: bool) -> int:
    from moge.inference.engine import Engine
    from moge.inference.tokenizer import load_tokenizer
    from moge.serve.app import build_app
    from moge.serve.runner import EngineRunner

    try:
        tokenizer = load_tokenizer(args.model)
    except MissingFileError as e:
        tokenizer = None
        print(f"moge serve: warning: {e}; prompts must be token ids and chat is off", file=sys.stderr)
    from moge.inference.threads import FixedThreads, decode_threads

    # ranks of a distributed engine step together: one fixed count everywhere
    threads = FixedThreads() if distributed else decode_threads(args.threads, next(model.parameters()).device)
    engine = Engine(model, config, distributed=distributed, threads=threads)
    # the engine loop keeps the main thread, where the model was loaded (see EngineRunner)
    runner = EngineRunner(engine, keepalive_s=args.dist_timeout / 4 if distributed else None, own_thread=False)
    try:
        name = args.served_model_name or Path(args.model).resolve().name
        api_key = args.api_key if args.api_key is not None else os.environ.get("MOGE_API_KEY")
        app = build_app(runner, tokenizer, model_name=name, api_key=api_key or None,
                        max_body_bytes=args.max_body_bytes)
        sock = _bind(args.host, args.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host

        def ready() -> None:
            print(f"moge serve: listening on http://{shown}:{port} (model {name})", flush=True)

        server = _uvicorn(app, args.log_level, ready)

        def serve_http() -> None:
            try:
                server.run(sockets=[sock])
            finally:  # the server stopped (or never started): end the engine loop too
                runner.close()

        http = threading.Thread(target=serve_http, name="moge-http", daemon=True)
        signal.signal(signal.SIGTERM, _interrupt)  # a polite kill stops like Ctrl-C
        http.start()
        try:
            runner.run()  # until the app's lifespan closes the runner (the server stops)
        except KeyboardInterrupt:  # Ctrl-C reaches the main thread: stop the server gracefully
            pass
        finally:
            server.should_exit = True
            http.join(timeout=30)
    finally:
        runner.close()  # idempotent: the app's lifespan normally did it
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: a free one), bound here so the port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot bind: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn(app, log_level: str, on_ready):
    """A uvicorn server for `app` that calls `on_ready` once it accepts connections. Run on a side
    thread it installs no signal handlers: Ctrl-C reaches the main thread, which stops it."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
