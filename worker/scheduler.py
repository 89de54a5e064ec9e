"""The head runner's schedule: which requests run, in which steps.

Requests wait in a bounded queue. One at a time is admitted: its prompt is
prefilled in chunks of ``prefill_step`` tokens (the last prompt token alone,
in the step that samples, as mlx-lm does, so greedy output matches
single-process mlx-lm token for token), alternating with decode steps of the
running batch so that a long prompt does not stall the streams already
running. Once its first token is sampled it joins the batch; finished and
cancelled rows leave at the next step. The engine thread asks ``next_step``
and reports sampled tokens with ``on_tokens``; gRPC threads submit and
cancel. Nothing here touches MLX or sockets.
"""

from __future__ import annotations

import queue
import threading
import time
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
    submitted: float = 0.0

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
    done: bool = False


class Scheduler:
    """Continuous batching: requests join the running batch and leave it."""

    def __init__(
        self,
        make_detokenizer: Callable[[], Any],
        eos_token_ids: Iterable[int],
        *,
        prefill_step: int = 512,
        max_queue: int = 64,
        max_batch: int = 16,
    ):
        self._make_detokenizer = make_detokenizer
        self._eos = frozenset(eos_token_ids)
        self._prefill_step = prefill_step
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._queue: deque[GenRequest] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Active] = []
        self._admitting: _Active | None = None
        self._last: Step | None = None
        self.tokens_total = 0
        self.requests_total = 0
        self.ttfts: deque[float] = deque(maxlen=64)

    # -- called from request threads ------------------------------------------

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if len(self._queue) >= self._max_queue:
                raise QueueFull(
                    f"the request queue is full ({self._max_queue} waiting); try again shortly"
                )
            req.submitted = time.monotonic()
            self._queue.append(req)
            self.requests_total += 1
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
            return not self._rows and self._admitting is None and not self._queue

    @property
    def in_flight(self) -> int:
        return len(self._rows) + (self._admitting is not None)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # -- called from the engine thread ----------------------------------------

    def next_step(self) -> Step | None:
        """The next step to run, or None when there is nothing to do."""
        remove = []
        for i, row in enumerate(self._rows):
            if not row.done and row.req.cancelled.is_set():
                self._finish(row, Finish.CANCELLED)
            if row.done:
                remove.append(i)
        self._rows = [r for r in self._rows if not r.done]
        admitting = self._admitting
        if admitting is not None and admitting.req.cancelled.is_set():
            self._finish(admitting, Finish.CANCELLED)
            admitting = self._admitting = None
        if admitting is None and len(self._rows) < self._max_batch:
            admitting = self._admitting = self._next_request()
        prefill = admitting is not None and (
            not self._rows or self._last is None or not self._last.prefill
        )
        if prefill:
            assert admitting is not None
            step = self._prefill_step_for(admitting, tuple(remove))
        elif self._rows:
            tokens = [r.generated[-1] for r in self._rows]
            step = Step(tokens, prefill=False, remove=tuple(remove))
        else:
            step = None
        self._last = step
        return step

    def _next_request(self) -> _Active | None:
        with self._cond:
            while self._queue:
                req = self._queue.popleft()
                active = _Active(req, self._make_detokenizer(), StopMatcher(req.stop))
                if not req.cancelled.is_set():
                    return active
                self._finish(active, Finish.CANCELLED)
        return None

    def _prefill_step_for(self, a: _Active, remove: tuple[int, ...]) -> Step:
        prompt = a.req.prompt
        remaining = len(prompt) - a.prefilled
        new = a.prefilled == 0
        # The prompt's last token is fed alone, in the step that samples, as
        # mlx-lm does: greedy output then matches it token for token.
        n = min(self._prefill_step, remaining - 1) if remaining > 1 else 1
        chunk = prompt[a.prefilled : a.prefilled + n]
        a.prefilled += n
        return Step(
            chunk,
            prefill=True,
            sample=a.prefilled == len(prompt),
            new_sequence=new,
            sampling=a.req.sampling,
            remove=remove,
        )

    def on_tokens(self, tokens: list[int]) -> None:
        step = self._last
        if step is None:
            return
        if step.prefill:
            admitting = self._admitting
            assert admitting is not None and len(tokens) == 1
            self._admitting = None
            self._rows.append(admitting)  # joined the batch on every rank
            self.ttfts.append(time.monotonic() - admitting.req.submitted)
            self._accept(admitting, tokens[0])
            return
        for row, token in zip(self._rows, tokens, strict=True):
            self._accept(row, token)

    def _accept(self, active: _Active, token: int) -> None:
        if active.done:
            return
        self.tokens_total += 1
        if token in self._eos:
            self._finish(active, Finish.STOP)
            return
        active.generated.append(token)
        active.unsent.append(token)
        active.detokenizer.add_token(token)
        text, stopped = active.matcher.push(active.detokenizer.last_segment)
        self._emit(active, text)
        if stopped:
            self._finish(active, Finish.STOP, flush=False)
        elif len(active.generated) >= active.req.max_tokens:
            self._finish(active, Finish.LENGTH)

    def fail_all(self, error: str) -> None:
        """End the running and waiting requests with an error."""
        for row in self._rows:
            self._finish(row, Finish.ERROR, error)
        if self._admitting is not None:
            self._finish(self._admitting, Finish.ERROR, error)
        self._rows, self._admitting, self._last = [], None, None
        with self._cond:
            waiting, self._queue = list(self._queue), deque()
        for req in waiting:
            req.events.put(Done(Finish.ERROR, len(req.prompt), 0, error))

    # -- internals --------------------------------------------------------------

    def _emit(self, active: _Active, text: str) -> None:
        if text or active.unsent:
            active.req.events.put(Delta(tuple(active.unsent), text))
            active.unsent = []

    def _finish(
        self, active: _Active, reason: Finish, error: str = "", *, flush: bool = True
    ) -> None:
        if active.done:
            return
        if flush and reason in (Finish.STOP, Finish.LENGTH):
            active.detokenizer.finalize()
            text, _ = active.matcher.push(active.detokenizer.last_segment)
            self._emit(active, text + active.matcher.flush())
        req = active.req
        req.events.put(Done(reason, len(req.prompt), len(active.generated), error))
        active.done = True
