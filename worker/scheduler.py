"""The head runner's schedule: which request runs, in which steps.

Requests wait in a bounded queue; the running one is prefilled in chunks
(``prefill_step`` tokens; the prompt's last token is fed alone, as mlx-lm
does, so greedy output matches single-process mlx-lm token for token) and then
decoded one token a step. The engine thread asks ``next_step`` and reports
sampled tokens with ``on_token``; gRPC threads submit and cancel. Nothing here
touches MLX or sockets.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pomona.worker.lockstep import Sampling, Step


class Finish(Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Delta:
    """Tokens produced since the last event, and the text they completed."""

    tokens: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Done:
    reason: Finish
    prompt_tokens: int
    completion_tokens: int
    error: str = ""


class QueueFull(Exception):
    pass


@dataclass
class GenRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    events: queue.Queue[Delta | Done] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class StopMatcher:
    """Streams text, holding back what could still become a stop string."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class _Active:
    req: GenRequest
    detokenizer: Any
    matcher: StopMatcher
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        make_detokenizer: Callable[[], Any],
        eos_token_ids: Iterable[int],
        *,
        prefill_step: int = 512,
        max_queue: int = 64,
    ):
        self._make_detokenizer = make_detokenizer
        self._eos = frozenset(eos_token_ids)
        self._prefill_step = prefill_step
        self._max_queue = max_queue
        self._queue: deque[GenRequest] = deque()
        self._cond = threading.Condition()
        self._active: _Active | None = None

    # -- called from request threads ------------------------------------------

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if len(self._queue) >= self._max_queue:
                raise QueueFull(
                    f"the request queue is full ({self._max_queue} waiting); try again shortly"
                )
            self._queue.append(req)
            self._cond.notify_all()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block (without spinning) until a request is waiting."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._queue), timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._active is None and not self._queue

    # -- called from the engine thread ----------------------------------------

    def next_step(self) -> Step | None:
        """The next step to run, or None when there is nothing to do."""
        while True:
            active = self._active
            if active is None:
                with self._cond:
                    if not self._queue:
                        return None
                    req = self._queue.popleft()
                self._active = active = _Active(
                    req, self._make_detokenizer(), StopMatcher(req.stop)
                )
            req = active.req
            if req.cancelled.is_set():
                self._finish(Finish.CANCELLED)
                continue
            remaining = len(req.prompt) - active.prefilled
            new = active.prefilled == 0
            if remaining > 1:
                n = min(self._prefill_step, remaining - 1)
                chunk = req.prompt[active.prefilled : active.prefilled + n]
                active.prefilled += n
                return Step(chunk, sample=False, new_sequence=new, sampling=req.sampling)
            if remaining == 1:
                active.prefilled += 1
                return Step(req.prompt[-1:], sample=True, new_sequence=new, sampling=req.sampling)
            return Step(active.generated[-1:], sample=True, sampling=req.sampling)

    def on_token(self, token: int) -> None:
        active = self._active
        if active is None:
            return
        if token in self._eos:
            self._finish(Finish.STOP)
            return
        active.generated.append(token)
        active.unsent.append(token)
        active.detokenizer.add_token(token)
        text, stopped = active.matcher.push(active.detokenizer.last_segment)
        self._emit(text)
        if stopped:
            self._finish(Finish.STOP, flush=False)
        elif len(active.generated) >= active.req.max_tokens:
            self._finish(Finish.LENGTH)

    def fail_all(self, error: str) -> None:
        """End the running and waiting requests with an error."""
        if self._active is not None:
            self._finish(Finish.ERROR, error)
        with self._cond:
            waiting, self._queue = list(self._queue), deque()
        for req in waiting:
            req.events.put(Done(Finish.ERROR, len(req.prompt), 0, error))

    # -- internals --------------------------------------------------------------

    def _emit(self, text: str) -> None:
        active = self._active
        assert active is not None
        if text or active.unsent:
            active.req.events.put(Delta(tuple(active.unsent), text))
            active.unsent = []

    def _finish(self, reason: Finish, error: str = "", *, flush: bool = True) -> None:
        active = self._active
        assert active is not None
        if flush and reason in (Finish.STOP, Finish.LENGTH):
            active.detokenizer.finalize()
            text, _ = active.matcher.push(active.detokenizer.last_segment)
            self._emit(text + active.matcher.flush())
        req = active.req
        req.events.put(Done(reason, len(req.prompt), len(active.generated), error))
        self._active = None
