"""The FastAPI application: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/health and /metrics, over an `EngineRunner`.

A request is read (size-limited), validated (`protocol`, then `Engine.check`) and only then queued.
Its outputs are relayed as one JSON answer or as Server-Sent Events; a client that goes away, with
either, is aborted in the engine, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Receive, Scope, Send

from moge.errors import ConfigError
from moge.inference.engine import QueueFull, Request
from moge.inference.generate import Sampling
from moge.inference.tokenizer import TURN_END, TURN_START, Tokenizer, chat_prompt
from moge.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, engine_error_param, error_body,
                                 parse, unsupported)
from moge.serve.runner import EngineRunner, RequestHandle, TextStream

DEFAULT_MAX_BODY_BYTES = 1 << 20
log = logging.getLogger("moge.serve")


def build_app(runner: EngineRunner, tokenizer: Tokenizer | None, *, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The server's application. Its lifespan starts the runner's engine thread and closes it (and the
    engine) at shutdown. `api_key` guards every route but /health."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, runner.close)

    app = FastAPI(title="moge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    service = _Service(runner, tokenizer, model_name, max_body_bytes)
    metrics = runner.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: HttpRequest, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not runner.healthy:
            return JSONResponse(error_body(503, runner.error or "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "moge",
             "max_model_len": runner.max_model_len}]})

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Response:
        req = parse(CompletionRequest, await _read_body(request, max_body_bytes))
        return await service.serve(request, service.completion_job(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Response:
        req = parse(ChatCompletionRequest, await _read_body(request, max_body_bytes))
        return await service.serve(request, service.chat_job(req))

    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    return app


@dataclass
class _Job:
    """One request on its way through the engine: what to send back and how far it got."""

    request: Request
    chat: bool
    stream: bool
    include_usage: bool
    return_ids: bool
    text: TextStream
    created: int = field(default_factory=lambda: int(time.time()))
    handle: RequestHandle | None = None
    ids: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    counted: bool = False  # in the finish-reason metric


class _Service:
    def __init__(self, runner: EngineRunner, tokenizer: Tokenizer | None, model_name: str, max_body_bytes: int):
        self.runner, self.tokenizer, self.model_name = runner, tokenizer, model_name
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    # ---- requests -> engine requests -------------------------------------------------------------------

    def completion_job(self, req: CompletionRequest) -> _Job:
        self._common_checks(req)
        if isinstance(req.prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "prompt: this model has no tokenizer: give the prompt as a list of token ids",
                               param="prompt")
            ids = self.tokenizer.encode(req.prompt, add_bos=self.tokenizer.bos_id is not None)
        else:
            ids = list(req.prompt)
        eos = self.runner.model_config.eos_token_id
        stop_ids = frozenset() if req.ignore_eos or eos is None else frozenset({eos})
        return self._job(req, ids, req.max_tokens or 16, stop_ids, chat=False)

    def chat_job(self, req: ChatCompletionRequest) -> _Job:
        self._common_checks(req)
        tok = self.tokenizer
        if tok is None or tok.token_to_id(TURN_START) is None or tok.token_to_id(TURN_END) is None:
            why = "has no tokenizer" if tok is None else f"has no chat turn markers {TURN_START}/{TURN_END}"
            raise ApiError(400, f"messages: chat is not available: this model {why}; use /v1/completions",
                           param="messages", code="chat_not_supported")
        try:
            text, stop_id = chat_prompt([(m.role, m.text()) for m in req.messages], tok)
        except ConfigError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = tok.encode(text, add_bos=tok.bos_id is not None)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, self.runner.max_model_len - len(ids))
        stop_ids = frozenset() if req.ignore_eos else frozenset({stop_id})
        return self._job(req, ids, max_tokens, stop_ids, chat=True)

    def _common_checks(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        unsupported(req)
        if req.stop and self.tokenizer is None:
            raise ApiError(400, "stop: stop strings need a tokenizer, and this model has none", param="stop")
        limit = self.runner.max_model_len
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name, None)
            if value is not None and value >= limit:
                raise ApiError(400, f"{name}: {value} is too large: the context is {limit} tokens, prompt included",
                               param=name)

    def _job(self, req, ids: list[int], max_tokens: int, stop_ids: frozenset[int], chat: bool) -> _Job:
        sampling = Sampling(1.0 if req.temperature is None else req.temperature, max(0, req.top_k or 0),
                            1.0 if req.top_p is None else req.top_p, req.seed)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request = Request(rid, ids, max_tokens, sampling, stop_ids)
        try:
            self.runner.check(request)
        except ConfigError as e:
            param = engine_error_param(str(e), ("prompt", "max_tokens"))
            raise ApiError(400, str(e), param="messages" if chat and param == "prompt" else param) from None
        return _Job(request, chat, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                    req.return_token_ids, TextStream(self.tokenizer, req.stop or []))

    # ---- running a job ---------------------------------------------------------------------------------

    async def serve(self, http: HttpRequest, job: _Job) -> Response:
        try:
            job.handle = self.runner.submit(job.request)
        except QueueFull as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:
            raise ApiError(503, str(e)) from None
        if job.stream:
            return _EventStream(self._sse(job), lambda: self._cancel(job))
        collect = asyncio.ensure_future(self._collect(job))
        gone = asyncio.ensure_future(_disconnected(http))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client left: abort (the generator's cleanup does it)
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
            return Response(status_code=499)
        gone.cancel()
        collect.result()
        if job.finish == "error":
            raise ApiError(500, f"generation failed: {job.error}")
        return JSONResponse(self._final(job))

    async def _collect(self, job: _Job) -> None:
        async with contextlib.aclosing(self._events(job)) as events:
            async for _ in events:
                pass

    async def _events(self, job: _Job) -> AsyncIterator[tuple[str, list[int]]]:
        """(text delta, new token ids) as they come; `job.finish` is set before the last one. Leaving
        early (client gone) aborts the request in the engine."""
        assert job.handle is not None
        try:
            while job.finish is None:
                out = await job.handle.queue.get()
                strip = (out.finish_reason == "stop" and bool(out.token_ids)
                         and out.token_ids[-1] in job.request.stop_ids)
                delta = job.text.push(out.token_ids, final=out.finished, strip_last=strip)
                job.ids += out.token_ids
                if job.text.stopped:
                    if not out.finished:
                        self.runner.abort(job.request.request_id)
                    job.finish = "stop"
                elif out.finished:
                    job.finish, job.error = out.finish_reason, out.error
                if delta or out.token_ids or job.finish:
                    yield delta, out.token_ids
        finally:
            self._cancel(job)

    def _cancel(self, job: _Job) -> None:
        """Account for the job once; abort it in the engine if it had not finished."""
        if job.finish is None:
            job.finish = "abort"
            self.runner.abort(job.request.request_id)
        if not job.counted:
            job.counted = True
            self.runner.metrics.requests.labels(job.finish).inc()

    async def _sse(self, job: _Job) -> AsyncIterator[bytes]:
        if job.chat:
            yield _sse(self._chunk(job, {"role": "assistant", "content": ""}, [], None))
        async with contextlib.aclosing(self._events(job)) as events:
            async for delta, ids in events:
                if job.finish == "error":
                    yield _sse(error_body(500, f"generation failed: {job.error}"))
                    break
                content = ({"content": delta} if delta or not job.finish else {}) if job.chat else delta
                yield _sse(self._chunk(job, content, ids, job.finish))
        if job.include_usage:
            yield _sse(self._envelope(job, [], usage=True))
        yield b"data: [DONE]\n\n"

    # ---- response bodies -------------------------------------------------------------------------------

    def _envelope(self, job: _Job, choices: list, usage: bool) -> dict:
        kind = ("chat.completion" if job.chat else "text_completion") + (".chunk" if job.stream and job.chat else "")
        body = {"id": job.request.request_id, "object": kind, "created": job.created, "model": self.model_name,
                "choices": choices}
        if usage:
            n_prompt = len(job.request.prompt_ids)
            body["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(job.ids),
                             "total_tokens": n_prompt + len(job.ids)}
        return body

    def _chunk(self, job: _Job, content: str | dict, ids: list[int], finish: str | None) -> dict:
        choice = {"index": 0, ("delta" if job.chat else "text"): content, "logprobs": None, "finish_reason": finish}
        if job.return_ids:
            choice["token_ids"] = ids
        return self._envelope(job, [choice], usage=False)

    def _final(self, job: _Job) -> dict:
        choice: dict = {"index": 0}
        if job.chat:
            choice["message"] = {"role": "assistant", "content": job.text.text}
        else:
            choice["text"] = job.text.text
        choice |= {"logprobs": None, "finish_reason": job.finish}
        if job.return_ids:
            choice["token_ids"] = job.ids
            choice["prompt_token_ids"] = job.request.prompt_ids
        return self._envelope(job, [choice], usage=True)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused with 413 beyond `limit` bytes: from Content-Length before reading, and while
    reading (a chunked body has none)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise ApiError(413, f"the request body has {int(declared)} bytes; the limit is {limit} "
                                f"(--max-body-bytes)", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes (--max-body-bytes)",
                           code="request_too_large")
    return bytes(body)


async def _disconnected(request: HttpRequest) -> None:
    """Return when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(Response):
    """Server-Sent Events from an async iterator of frames. A client that disconnects (seen on the
    ASGI receive channel, or as a failed send) calls `on_disconnect` and closes the iterator."""

    def __init__(self, frames: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        # no Response.__init__: it would declare Content-Length: 0 for the empty initial body
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.frames, self.on_disconnect = frames, on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            failure = pumping.exception() if pumping.done() and not pumping.cancelled() else None
            finished = pumping.done() and failure is None
            if failure is not None and not isinstance(failure, OSError):  # OSError: the client went away
                log.error("moge serve: streaming a response failed", exc_info=failure)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.frames.aclose()  # type: ignore[attr-defined]
        if not finished:
            self.on_disconnect()


class _RequireKey:
    """`Authorization: Bearer <key>` on every route but /health, else 401 with the OpenAI error object."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(error_body(401, "a valid API key is required: send 'Authorization: Bearer "
                                                        "<key>'", code="invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
