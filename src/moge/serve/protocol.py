"""The OpenAI request bodies the server accepts (pydantic, strict types) and the error object it answers.

Every error is `{"error": {"message", "type", "param", "code"}}` with `param` naming the request
field at fault, so a client can tell which value to fix. Validation happens here and in
`Engine.check` before anything is queued: no malformed request reaches the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An HTTP error answered with the OpenAI error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (the sampling and stopping knobs)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0 = off (vLLM's extension)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens
    return_token_ids: bool = False  # vLLM's extension: token ids in each choice
    user: str | None = None
    # accepted only at their no-op values (see `unsupported`)
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class CompletionRequest(_Common):
    prompt: Any
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            raise ValueError("a batch of prompts is not supported: send one prompt (a string or a list of token "
                             "ids) per request")
        raise ValueError(f"must be a string or a list of integer token ids, got {_json_type(v)}")


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # None: the rest of the context (vLLM)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer OpenAI name, wins
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None


# (field, value that means "off") for options the engine cannot honour: anything else is a 400
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (False,),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []),
}


def unsupported(request: BaseModel) -> None:
    """A 400 for the first option set to something the server does not implement."""
    for name, off in _UNSUPPORTED.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if not any(value == o and type(value) is type(o) or value is o for o in off):
                raise ApiError(400, f"{name}={value!r} is not supported by this server "
                                    f"(leave it out or set it to {off[-1]!r})", param=name)


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The request body as `model`, or a 400 naming the first field at fault."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False)
    err = errors[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err['ctx'].get('error', err['msg'])}")
    loc = _field_path(err["loc"])
    if not loc:
        if err["type"] in ("model_type", "model_attributes_type"):
            return ApiError(400, "the request body must be a JSON object")
        return ApiError(400, err["msg"])
    param = str(loc[0])
    path = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    # a union field (stop, content) reports one error per member: say them all
    msgs = list(dict.fromkeys(x["msg"].removeprefix("Value error, ") for x in errors
                              if _field_path(x["loc"]) == loc))
    return ApiError(400, f"{path}: {' or '.join(msgs[:3])}", param=param)


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> list:
    """The error location without pydantic's union member tags (`str`, `list[str]`, ...)."""
    return [p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TAGS)]


def engine_error_param(message: str, fields: tuple[str, ...]) -> str | None:
    """The field an `Engine.check` message names first ("prompt: ...", "max_tokens: ...")."""
    head = message.split(":", 1)[0].split("=", 1)[0].strip()
    return head if head in fields else None


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)
