"""The head runner's gRPC service: requests enter the pipeline here.

Thin: validate, tokenize, hand the request to the scheduler, stream its
events back. Cancelling the call (or the client going away) frees the slot.
"""

from __future__ import annotations

import logging
import math
import queue
import random
from collections.abc import Iterator
from typing import Any

import grpc

from pomona import rpc
from pomona.v1 import common_pb2, runner_pb2_grpc
from pomona.worker.lockstep import Sampling
from pomona.worker.scheduler import Delta, Done, Finish, GenRequest, QueueFull, Scheduler

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
MAX_PROMPT_CHARS = 4 << 20

_FINISH = {
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}


class RequestError(ValueError):
    """A request the runner refuses, with the gRPC status to refuse it with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


def validate_sampling(s: common_pb2.SamplingParams) -> Sampling:
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise RequestError(f"temperature must be a number >= 0, got {s.temperature}")
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise RequestError(f"top_p must be between 0 and 1, got {s.top_p}")
    if s.top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {s.top_k}")
    if not math.isfinite(s.min_p) or not 0 <= s.min_p <= 1:
        raise RequestError(f"min_p must be between 0 and 1, got {s.min_p}")
    seed = s.seed if s.HasField("seed") else random.getrandbits(62)
    top_p = 0.0 if s.top_p >= 1 else s.top_p
    return Sampling(s.temperature, top_p, s.top_k, s.min_p, seed & ((1 << 62) - 1))


ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MAX_MESSAGES = 1024


def encode_prompt(
    tokenizer: Any, request: common_pb2.GenerateRequest, vocab_size: int
) -> list[int]:
    given = [bool(request.prompt), bool(request.prompt_tokens), bool(request.messages)]
    if sum(given) != 1:
        raise RequestError("set exactly one of prompt, prompt_tokens and messages")
    if request.prompt_tokens:
        tokens = list(request.prompt_tokens)
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(
                f"prompt token {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
            )
        return tokens
    if request.messages:
        return _encode_chat(tokenizer, request.messages)
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"the prompt is over {MAX_PROMPT_CHARS} characters")
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not request.prompt.startswith(bos)
    return list(tokenizer.encode(request.prompt, add_special_tokens=add_special))


# mlx_lm.server's `convert_chat` default role mapping, for models without a chat template
# (base models); a test pins it to mlx-lm's own function.
_PLAIN_ROLES = {"system": "ASSISTANT's RULE: ", "user": "USER: ", "assistant": "ASSISTANT: "}


def plain_chat_prompt(chat: list[dict[str, str]]) -> str:
    """ "USER: hi\nASSISTANT:": each message on its line after its role, as mlx_lm.server
    formats a chat for a model with no chat template."""
    text = "".join(f"{_PLAIN_ROLES.get(m['role'], '')}{m['content']}\n" for m in chat)
    return (text + _PLAIN_ROLES["assistant"]).rstrip()


def _encode_chat(tokenizer: Any, messages: Any) -> list[int]:
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"at most {MAX_MESSAGES} messages")
    chat = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise RequestError(f"message {i} has role {m.role!r}; use one of {sorted(ROLES)}")
        chat.append({"role": m.role, "content": m.content})
    if sum(len(m["content"]) for m in chat) > MAX_PROMPT_CHARS:
        raise RequestError(f"the messages are over {MAX_PROMPT_CHARS} characters")
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer.encode(plain_chat_prompt(chat)))
    try:
        tokens = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a template may raise on a conversation it does not accept
        raise RequestError(f"the model's chat template refused these messages: {e}") from e
    if isinstance(tokens, dict):  # some tokenizers return a BatchEncoding
        tokens = tokens["input_ids"]
    return [int(t) for t in tokens]


class RunnerService(runner_pb2_grpc.RunnerServicer):
    def __init__(self, scheduler: Scheduler, tokenizer: Any, max_context: int, vocab_size: int):
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._max_context = max_context
        self._vocab_size = vocab_size

    def _build(self, request: common_pb2.GenerateRequest) -> GenRequest:
        if request.max_tokens <= 0:
            raise RequestError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if len(request.stop) > MAX_STOP_STRINGS or any(
            len(s) > MAX_STOP_LENGTH for s in request.stop
        ):
            raise RequestError(
                f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters"
            )
        sampling = validate_sampling(request.sampling)
        prompt = encode_prompt(self._tokenizer, request, self._vocab_size)
        if not prompt:
            raise RequestError("the prompt is empty")
        max_tokens = request.max_tokens
        if request.fit_max_tokens:
            max_tokens = min(max_tokens, self._max_context - len(prompt))
            if max_tokens <= 0:
                raise RequestError(
                    f"the prompt ({len(prompt)} tokens) fills the model's context of "
                    f"{self._max_context} tokens; shorten it"
                )
        if len(prompt) + max_tokens > self._max_context:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the model's context of {self._max_context} tokens; "
                "shorten the prompt or lower max_tokens"
            )
        return GenRequest(
            request_id=request.request_id,
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=tuple(request.stop),
        )

    def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.GenerateChunk]:
        try:
            req = self._build(request)
            self._scheduler.submit(req)
        except RequestError as e:
            context.abort(e.code, str(e))
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Exception as e:  # a fault of this request, not of the pipeline
            log.exception("request %s failed", request.request_id)
            context.set_trailing_metadata(((rpc.REQUEST_FAULT, "1"),))
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        context.add_callback(req.cancel)
        rid = request.request_id
        while True:
            try:
                event = req.events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    req.cancel()
                    self._scheduler.wake()
                    return
                continue
            if isinstance(event, Delta):
                yield common_pb2.GenerateChunk(request_id=rid, tokens=event.tokens, text=event.text)
                continue
            assert isinstance(event, Done)
            if event.reason is Finish.ERROR:
                context.abort(grpc.StatusCode.UNAVAILABLE, event.error)
            yield common_pb2.GenerateChunk(
                request_id=rid,
                finish_reason=_FINISH[event.reason],
                usage=common_pb2.Usage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    cached_tokens=event.cached_tokens,
                    drafted_tokens=event.drafted_tokens,
                    accepted_tokens=event.accepted_tokens,
                ),
            )
            return
