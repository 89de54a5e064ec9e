"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Thin, like the gRPC service: parse the body (``openai_schema``), call the
cluster's internal request path, shape its chunks as OpenAI's objects. Errors
leave as OpenAI's error JSON; a cluster's gRPC status picks the HTTP status.

A client that goes away must free its slot in the batch at once, so the app
asks aiohttp to cancel a handler when its connection is lost
(``handler_cancellation``); the handler then closes the chunk iterator, which
cancels the request in the cluster.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from pomona.coordinator.openai_schema import (
    ApiError,
    Limits,
    Parsed,
    check_model,
    decode_json,
    parse_chat,
    parse_completion,
    short_model_name,
)
from pomona.v1 import common_pb2

log = logging.getLogger(__name__)

Generate = Callable[[common_pb2.GenerateRequest], AsyncIterator[common_pb2.GenerateChunk]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Kind = Literal["chat", "text"]

MAX_BODY_BYTES = 8 << 20
_INT32_MAX = (1 << 31) - 1
DEFAULT_CHAT_MAX_TOKENS = 4096

# How a cluster's gRPC status reads over HTTP: (status, OpenAI error type, code).
_FROM_GRPC: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "requests", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", None),
    grpc.StatusCode.CANCELLED: (503, "server_error", None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", None),
}
_FINISH = {common_pb2.FINISH_REASON_LENGTH: "length"}


def create_app(
    *,
    generate: Generate,
    model_name: Callable[[], str],
    api_key: str | None = None,
    max_tokens_cap: int = 32768,
    extra_routes: Sequence[web.RouteDef] = (),
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
) -> web.Application:
    """The HTTP API over ``generate``, the cluster's internal request path.

    ``api_key``: when set, ``/v1/*`` wants ``Authorization: Bearer <api_key>``.
    ``default_max_tokens``: what a chat request that names no max_tokens asks
    for (0 sends 0: for a cluster that reads it as "until the context is full").
    Legacy completions default to 16, as OpenAI's do.
    """
    if not 1 <= max_tokens_cap <= _INT32_MAX:
        raise ValueError(f"max_tokens_cap must be between 1 and {_INT32_MAX}")
    if default_max_tokens < 0:
        raise ValueError(f"default_max_tokens must be >= 0, got {default_max_tokens}")
    limits = Limits(max_tokens_cap, min(default_max_tokens, max_tokens_cap))
    api = _Api(generate, model_name, limits)
    app = web.Application(
        middlewares=[_openai_errors, _bearer_auth(api_key)],
        client_max_size=MAX_BODY_BYTES,
        # Cancel a handler when its client disconnects: that frees the slot at once.
        handler_args={"handler_cancellation": True},
    )
    app.add_routes(
        [
            web.get("/health", api.health),
            web.get("/v1/models", api.list_models),
            web.get("/v1/models/{model:.+}", api.get_model),
            web.post("/v1/chat/completions", api.chat_completions),
            web.post("/v1/completions", api.completions),
        ]
    )
    app.add_routes(extra_routes)
    return app


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure under /v1 answers OpenAI's error JSON, never a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status < 400 or not _is_api(request):
            raise
        if e.status == 404:
            message = f"Invalid URL ({request.method} {request.path})"
        elif e.status == 405:
            message = f"Method {request.method} is not allowed on {request.path}"
        elif e.status == 413:
            message = f"The request body is over {MAX_BODY_BYTES >> 20} MB."
        else:
            message = e.reason
        return _error_response(ApiError(e.status, message))
    except Exception:
        if not _is_api(request):
            raise
        log.exception("%s %s failed", request.method, request.path)
        return _error_response(ApiError(500, "Internal server error.", type="server_error"))


def _bearer_auth(api_key: str | None) -> Middleware:
    expected = api_key.encode() if api_key else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or not request.path.startswith("/v1/"):
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            message = (
                "You didn't provide an API key. Send it as a Bearer token: "
                "Authorization: Bearer YOUR_KEY."
            )
            return _error_response(ApiError(401, message), {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), expected):
            error = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            return _error_response(error, {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


class _Api:
    def __init__(self, generate: Generate, model_name: Callable[[], str], limits: Limits):
        self._generate = generate
        self._model_name = model_name
        self._limits = limits
        self._created = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        if self._model_name():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unavailable"}, status=503)

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "pomona"}

    async def list_models(self, request: web.Request) -> web.Response:
        name = self._model_name()
        data = [self._model_object(name)] if name else []
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        name = self._model_name()
        requested = request.match_info["model"]
        if not name or requested not in (name, short_model_name(name)):
            raise ApiError(
                404,
                f"The model `{requested}` does not exist.",
                param="model",
                code="model_not_found",
            )
        return web.json_response(self._model_object(name))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = decode_json(await request.read())
        check_model(body, self._model_name())
        return await self._answer(request, parse_chat(body, self._limits), "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = decode_json(await request.read())
        check_model(body, self._model_name())
        return await self._answer(request, parse_completion(body, self._limits), "text")

    async def _answer(self, request: web.Request, parsed: Parsed, kind: Kind) -> web.StreamResponse:
        shape = _Shape(
            kind=kind,
            id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex,
            created=int(time.time()),
            model=self._model_name(),
            include_usage=parsed.include_usage,
        )
        parsed.request.request_id = shape.id
        source: AsyncIterable[common_pb2.GenerateChunk] | None = None
        try:
            # Wait for the first chunk before answering, so that a refusal
            # (queue full, not serving, bad prompt) keeps its HTTP status.
            try:
                source = self._generate(parsed.request)
                chunks = aiter(source)
            except Exception as e:
                raise _cluster_error(e) from None
            first = await _next(chunks)
            if parsed.stream:
                return await _stream(request, shape, first, chunks)
            return await _collect(shape, first, chunks)
        finally:
            if source is not None:
                await _close(source)


@dataclass(frozen=True)
class _Shape:
    """What every object of one response carries."""

    kind: Kind
    id: str
    created: int
    model: str
    include_usage: bool

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        out = self.envelope([choice], chunk=True)
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.envelope([], chunk=True), "usage": usage}

    def whole(self, text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {**self.envelope([choice], chunk=False), "usage": usage}


class _Tally:
    """The finish reason and token counts of a generation, from its chunks."""

    def __init__(self) -> None:
        self.finish = "stop"
        self.tokens = 0
        self.reported: common_pb2.Usage | None = None

    def add(self, chunk: common_pb2.GenerateChunk) -> None:
        self.tokens += len(chunk.tokens)
        if chunk.finish_reason:
            self.finish = _FINISH.get(chunk.finish_reason, "stop")
        if chunk.HasField("usage"):
            self.reported = chunk.usage

    def usage(self) -> dict[str, Any]:
        prompt = self.reported.prompt_tokens if self.reported else 0
        completion = self.reported.completion_tokens if self.reported else self.tokens
        cached = self.reported.cached_tokens if self.reported else 0
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if self.reported and self.reported.drafted_tokens:
            # A Pomona extension (clients ignore fields they do not know).
            usage["pomona_speculative"] = {
                "drafted_tokens": self.reported.drafted_tokens,
                "accepted_tokens": self.reported.accepted_tokens,
            }
        return usage


async def _collect(
    shape: _Shape,
    first: common_pb2.GenerateChunk | None,
    chunks: AsyncIterator[common_pb2.GenerateChunk],
) -> web.Response:
    tally, parts = _Tally(), []
    chunk = first
    while chunk is not None:
        tally.add(chunk)
        parts.append(chunk.text)
        chunk = await _next(chunks)
    return web.json_response(shape.whole("".join(parts), tally.finish, tally.usage()), dumps=_dumps)


async def _stream(
    request: web.Request,
    shape: _Shape,
    first: common_pb2.GenerateChunk | None,
    chunks: AsyncIterator[common_pb2.GenerateChunk],
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    tally = _Tally()
    try:
        if shape.kind == "chat":
            await _send(response, shape.chunk(None, None, role=True))
        chunk = first
        while chunk is not None:
            tally.add(chunk)
            if chunk.text:
                await _send(response, shape.chunk(chunk.text, None))
            chunk = await _next(chunks)
        await _send(response, shape.chunk(None if shape.kind == "chat" else "", tally.finish))
        if shape.include_usage:
            await _send(response, shape.usage_chunk(tally.usage()))
        await response.write(b"data: [DONE]\n\n")
    except ApiError as e:
        # Headers are gone: report in the stream, as OpenAI's SDKs expect.
        log.warning("%s failed while streaming: %s", shape.id, e.message)
        try:
            await _send(response, e.body())
        except ConnectionError:
            pass
    except ConnectionError:
        log.info("%s: the client went away; request cancelled", shape.id)
    return response


async def _send(response: web.StreamResponse, obj: dict[str, Any]) -> None:
    await response.write(b"data: " + _dumps(obj).encode() + b"\n\n")


async def _next(
    chunks: AsyncIterator[common_pb2.GenerateChunk],
) -> common_pb2.GenerateChunk | None:
    """The next chunk, None at the end; a cluster's failure as an ApiError."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None
    except Exception as e:
        raise _cluster_error(e) from None


async def _close(source: object) -> None:
    """Cancel the request: close the iterator (and cancel a gRPC call)."""
    try:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
        cancel = getattr(source, "cancel", None)
        if cancel is not None:
            cancel()
    except Exception:
        log.warning("closing a generation failed", exc_info=True)


def _cluster_error(e: BaseException) -> ApiError:
    try:
        status = e.code()  # type: ignore[attr-defined]
    except Exception:
        status = None
    if not isinstance(status, grpc.StatusCode):
        log.error("generate failed", exc_info=e)
        return ApiError(500, "Internal server error.", type="server_error")
    try:
        details = e.details()  # type: ignore[attr-defined]
    except Exception:
        details = None
    message = (
        details if isinstance(details, str) and details else f"the cluster answered {status.name}"
    )
    http, kind, error_code = _FROM_GRPC.get(status, (500, "server_error", None))
    return ApiError(http, message, type=kind, code=error_code)


def _error_response(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    extra = dict(headers or {})
    if e.status == 429:
        extra.setdefault("Retry-After", "1")
    # ASCII: a message may quote the client's own (possibly broken) strings.
    return web.json_response(e.body(), status=e.status, headers=extra)


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/v1") or request.path == "/health"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
