"""OpenAI request bodies to ``GenerateRequest``s: parsing and validation, no I/O.

Every mistake in a body becomes an ``ApiError`` that ``openai_api`` renders as
OpenAI's error JSON; nothing here raises anything else on any JSON input.
Fields OpenAI defines that Pomona cannot honour (logprobs, tools, several
choices) are refused rather than silently ignored; unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pomona.v1 import common_pb2

MAX_STOP_SEQUENCES = 4
# OpenAI's default for /v1/completions; chat has no documented default.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# OpenAI's "developer" role is the newer name of "system"; chat templates know only the latter.
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_INT32_MAX = (1 << 31) - 1
_SEED_MIN = -(1 << 63)
_SEED_MAX = (1 << 64) - 1


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Limits:
    """Bounds set when the app is created."""

    max_tokens_cap: int
    # Used when a chat request names no max_tokens.
    default_chat_max_tokens: int


@dataclass(frozen=True)
class Parsed:
    """A validated request: what to ask the cluster and how to answer."""

    request: common_pb2.GenerateRequest
    stream: bool
    include_usage: bool


def decode_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying why it is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request: send a JSON object "
            "with Content-Type: application/json.",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {_kind(body)}.")
    return body


def check_model(body: dict[str, Any], served: str) -> None:
    """Accept the served model's exact name or the last component of its path."""
    requested = body.get("model")
    if requested is None:
        raise ApiError(400, "You must provide a model parameter.", param="model")
    if not isinstance(requested, str):
        raise _invalid_type("model", "a string", requested)
    if not served:
        return  # nothing is loaded: the cluster answers UNAVAILABLE with its reason
    if requested in (served, short_model_name(served)):
        return
    raise ApiError(
        404,
        f"The model `{requested}` does not exist; this cluster serves `{served}`.",
        param="model",
        code="model_not_found",
    )


def short_model_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def parse_chat(body: dict[str, Any], limits: Limits) -> Parsed:
    _refuse(body, "logprobs", lambda v: v is None or v is False, "logprobs are not supported")
    _refuse(body, "top_logprobs", lambda v: v is None or v == 0, "logprobs are not supported")
    _refuse(body, "tools", lambda v: v is None or v == [], "tools are not supported")
    _refuse(body, "functions", lambda v: v is None or v == [], "functions are not supported")
    _refuse(
        body,
        "response_format",
        lambda v: v is None or (isinstance(v, dict) and v.get("type", "text") == "text"),
        'only response_format {"type": "text"} is supported',
    )
    request = _common(body, limits, limits.default_chat_max_tokens)
    request.messages.extend(_messages(body.get("messages")))
    return _parsed(body, request)


def parse_completion(body: dict[str, Any], limits: Limits) -> Parsed:
    _refuse(body, "echo", lambda v: v is None or v is False, "echo is not supported")
    _refuse(body, "best_of", lambda v: v is None or v == 1, "best_of must be 1")
    _refuse(body, "logprobs", lambda v: v is None or v == 0, "logprobs are not supported")
    _refuse(body, "suffix", lambda v: v is None or v == "", "suffix is not supported")
    request = _common(body, limits, min(DEFAULT_COMPLETION_MAX_TOKENS, limits.max_tokens_cap))
    prompt = _prompt(body.get("prompt"))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_tokens.extend(prompt)
    return _parsed(body, request)


def _parsed(body: dict[str, Any], request: common_pb2.GenerateRequest) -> Parsed:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid_type("stream_options", "an object", options)
        include_usage = _boolean(options, "include_usage", "stream_options.include_usage")
    return Parsed(request, stream, stream and include_usage)


def _common(
    body: dict[str, Any], limits: Limits, default_max_tokens: int
) -> common_pb2.GenerateRequest:
    n = body.get("n")
    if n is not None and not _is_int(n):
        raise _invalid_type("n", "an integer", n)
    if n is not None and n != 1:
        raise ApiError(
            400,
            f"n must be 1, got {n}: Pomona generates one choice per request; "
            "send several requests instead.",
            param="n",
        )
    for key in ("presence_penalty", "frequency_penalty"):
        _number(body, key, -2.0, 2.0)  # accepted and checked, not applied
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _invalid_type("user", "a string", body["user"])

    max_tokens = _integer(body, "max_completion_tokens", 1, None)
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _integer(body, "max_tokens", 1, None), "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise ApiError(
            400,
            f"{key} is too large: {max_tokens}. This server generates at most "
            f"{limits.max_tokens_cap} tokens per request.",
            param=key,
            code="invalid_value",
        )

    temperature = _number(body, "temperature", 0.0, 2.0, default=1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, default=1.0)
    sampling = common_pb2.SamplingParams(
        # top_p 0 keeps only the likeliest token (greedy); the wire's 0 means "no top-p".
        temperature=0.0 if top_p == 0 else temperature,
        top_p=top_p,
        top_k=_integer(body, "top_k", 0, _INT32_MAX) or 0,
        min_p=_number(body, "min_p", 0.0, 1.0, default=0.0),
    )
    seed = _integer(body, "seed", _SEED_MIN, _SEED_MAX)
    if seed is not None:
        sampling.seed = seed % (1 << 64)
    return common_pb2.GenerateRequest(
        max_tokens=max_tokens or default_max_tokens,
        fit_max_tokens=max_tokens is None,
        sampling=sampling,
        stop=_stop(body.get("stop")),
    )


def _messages(value: object) -> list[common_pb2.ChatMessage]:
    if value is None:
        raise ApiError(400, "You must provide messages.", param="messages")
    if not isinstance(value, list):
        raise _invalid_type("messages", "an array", value)
    if not value:
        raise ApiError(400, "messages must not be empty.", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid_type(where, "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ApiError(
                400,
                f"Invalid value for '{where}.role': {json.dumps(role)}; "
                f"expected one of {', '.join(sorted(_ROLES))}.",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = _content(message.get("content"), f"{where}.content", role)
        out.append(common_pb2.ChatMessage(role=_ROLES[role], content=content))
    return out


def _content(value: object, where: str, role: str) -> str:
    if isinstance(value, str):
        return _text(value, where)
    if value is None and role == "assistant":
        return ""  # an assistant turn that only called tools
    if not isinstance(value, list):
        raise _invalid_type(where, "a string or an array of content parts", value)
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ApiError(
                400,
                f"Invalid '{where}[{j}]': only text content parts are supported.",
                param=f"{where}[{j}]",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _invalid_type(f"{where}[{j}].text", "a string", text)
        texts.append(_text(text, f"{where}[{j}].text"))
    return "\n".join(texts)


def _prompt(value: object) -> str | list[int]:
    if value is None:
        raise ApiError(400, "You must provide a prompt.", param="prompt")
    if isinstance(value, str):
        return _text(value, "prompt")
    if not isinstance(value, list):
        raise _invalid_type("prompt", "a string, an array of one string or of token ids", value)
    if not value:
        raise ApiError(400, "prompt must not be empty.", param="prompt")
    if all(_is_int(t) for t in value):
        return _tokens(value)
    if len(value) > 1:
        raise ApiError(
            400,
            f"Pomona takes one prompt per request, got {len(value)}; send several requests.",
            param="prompt",
        )
    (only,) = value
    if isinstance(only, str):
        return _text(only, "prompt")
    if isinstance(only, list) and only and all(_is_int(t) for t in only):
        return _tokens(only)
    raise _invalid_type("prompt[0]", "a string or a non-empty array of token ids", only)


def _tokens(value: list[Any]) -> list[int]:
    bad = [t for t in value if not 0 <= t <= _INT32_MAX]
    if bad:
        raise ApiError(400, f"Invalid token id in prompt: {bad[0]}.", param="prompt")
    return [int(t) for t in value]


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _invalid_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise ApiError(
            400,
            f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}.",
            param="stop",
            code="invalid_value",
        )
    return [_text(s, "stop") for s in value if s]


def _refuse(body: dict[str, Any], key: str, ok: Callable[[Any], bool], message: str) -> None:
    if key in body and not ok(body[key]):
        raise ApiError(400, f"Invalid '{key}': {message}.", param=key)


def _number(body: dict[str, Any], key: str, lo: float, hi: float, default: float = 0.0) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid_type(key, "a number", value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"Invalid '{key}': expected a finite number.", param=key)
    if not lo <= value <= hi:
        raise ApiError(
            400,
            f"Invalid '{key}': expected a value between {lo:g} and {hi:g}, got {_show(value)}.",
            param=key,
            code="invalid_value",
        )
    return float(value)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise _invalid_type(key, "an integer", value)
    if value < lo:
        raise ApiError(
            400,
            f"Invalid '{key}': integer below minimum value. "
            f"Expected a value >= {lo}, but got {_show(value)} instead.",
            param=key,
            code="integer_below_min_value",
        )
    if hi is not None and value > hi:
        raise ApiError(
            400,
            f"Invalid '{key}': integer above maximum value. "
            f"Expected a value <= {hi}, but got {_show(value)} instead.",
            param=key,
            code="integer_above_max_value",
        )
    return int(value)


def _boolean(body: dict[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid_type(param or key, "a boolean", value)
    return value


def _text(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, f"Invalid '{where}': the string is not valid Unicode.", param=where
        ) from None
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid_type(key: str, expected: str, value: object) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{key}': expected {expected}, but got {_kind(value)} instead.",
        param=key,
        code="invalid_type",
    )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
