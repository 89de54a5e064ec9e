"""The head runner's schedule: which requests run, in which steps.

Requests wait in a bounded queue. The running requests are spread over the
engine's lanes (one per rank, see ``lockstep``); each lane takes one step at
a time and the lanes take turns, so one lane's step is on one rank while the
next lane's is on another. Waiting requests are admitted in groups, one group
per lane, the newcomers spread so the lanes stay balanced: a group's prompts
(all but their last token) are prefilled together in one batched chunk, or a
prompt longer than ``prefill_step`` alone in chunks of that size, each chunk
alternating with a decode step of the lane's running rows so that a long
prompt does not stall them. The group then joins its lane in a decode step
that feeds each newcomer's last prompt token and samples its first token, as
mlx-lm does, so greedy output matches single-process mlx-lm token for token.
Finished and cancelled rows leave at their lane's next step. The engine
thread asks ``next_step`` and reports sampled tokens with ``on_tokens``; gRPC
threads submit and cancel. Nothing here touches MLX or sockets.
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

from pomona.worker.lockstep import MAX_EVICT, MAX_JOIN, MAX_ROWS, MAX_STORE, Sampling, Step
from pomona.worker.prefix_cache import PrefixCache

# A batched prefill step holds at most this many tokens, padding included (or
# one prefill chunk, when --prefill-step is larger): the step the planner
# budgets activation memory for (coordinator/memory_fit.PREFILL_CHUNK_TOKENS).
GROUP_TOKENS = 2048


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
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    drafted_tokens: int = 0  # speculative decoding: tokens the draft proposed
    accepted_tokens: int = 0  # and of which the target accepted


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
    prefilled: int = 0  # prompt tokens fed before the join (all but the last)
    cached: int = 0  # of which restored from the prefix cache
    restore: int = 0  # the prefix-cache entry restored (pinned until its step is made)
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # generated tokens fed back (their KV is in the caches)
    reason: Finish | None = None
    unsent: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def to_prefill(self) -> list[int]:
        return self.req.prompt[self.prefilled : len(self.req.prompt) - 1]


@dataclass
class _Lane:
    """The head's view of one lane (see ``lockstep``)."""

    rows: list[_Active] = field(default_factory=list)
    group: list[_Active] = field(default_factory=list)  # being admitted
    remove: list[int] = field(default_factory=list)  # engine rows to drop next step
    store: list[tuple[int, int]] = field(default_factory=list)  # (engine row, entry)
    in_flight: int = 0  # decode steps launched and not yet collected (2: one chained)
    launched: float = 0.0  # when the last step not chained was launched
    arrived: float = 0.0  # when the tokens of its last step came in
    drafting: float = 0.0  # when the verify step in flight began drafting
    trim: int = 0  # positions of rejected drafts every stage drops at the next step
    row_trims: tuple[int, ...] = ()  # and those of single rows beyond ``trim``
    proposal: Any = None  # the drafts of the verify step in flight, by row
    last_prefill: bool = False
    group_started: bool = False  # the ranks hold caches for the group

    @property
    def busy(self) -> bool:
        """A decode step is in flight."""
        return self.in_flight > 0

    @property
    def load(self) -> int:
        """Requests running or being admitted here (finished rows not counted)."""
        return sum(not r.done for r in self.rows) + len(self.group)

    @property
    def active(self) -> bool:
        return bool(self.rows or self.group or self.in_flight)


class Scheduler:
    """Continuous batching: requests join the running lanes and leave them."""

    def __init__(
        self,
        make_detokenizer: Callable[[], Any],
        eos_token_ids: Iterable[int],
        *,
        prefill_step: int = 512,
        max_queue: int = 64,
        max_batch: int = 16,
        lanes: int = 1,
        rows_per_lane: int = MAX_ROWS,
        prefix_cache: PrefixCache | None = None,
        chain: bool = False,
        drafter: Any = None,
    ):
        self.prefix_cache = prefix_cache
        self._chain = chain  # launch a lone lane's decode steps on tokens in flight
        # Speculative decoding (``speculative.Drafter``): one-row lanes verify drafts.
        self.drafter = drafter
        self._make_detokenizer = make_detokenizer
        self._eos = frozenset(eos_token_ids)
        self._prefill_step = prefill_step
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._rows_per_lane = rows_per_lane
        self._queue: deque[GenRequest] = deque()
        self._cond = threading.Condition()
        self._lanes = [_Lane() for _ in range(max(1, lanes))]
        self._turn = 0
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
            return self.in_flight == 0 and not self._queue

    @property
    def in_flight(self) -> int:
        return sum(lane.load for lane in self._lanes)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # -- called from the engine thread ----------------------------------------

    def next_step(self) -> Step | None:
        """The next step to launch, or None when no lane can take one now."""
        for lane in self._lanes:
            if not lane.busy:
                self._reap(lane)
        self._admit()
        n = len(self._lanes)
        for k in range(n):
            i = (self._turn + k) % n
            step = self._step_for(i, self._lanes[i])
            if step is not None:
                self._turn = (i + 1) % n
                return step
        step = self._chained_step()
        if step is not None:
            return step
        if not any(lane.busy for lane in self._lanes):
            # Nothing in flight and nothing to do: the session ends and every
            # rank forgets its caches, so there is nothing left to remove.
            for lane in self._lanes:
                lane.remove.clear()
                lane.trim, lane.row_trims = 0, ()
        return None

    def _admit(self) -> None:
        """Form admission groups for lanes that have none, balancing the lanes.

        With a prefix cache, not while a finished row's KV is still to be kept:
        its request has ended, and the next turn of its chat may be waiting
        already (a chained step in flight delays the keeping by one step).
        """
        if self.prefix_cache is not None and any(
            r.done and r.reason in (Finish.STOP, Finish.LENGTH)
            for lane in self._lanes
            for r in lane.rows
        ):
            return
        with self._cond:
            while self._queue:
                free = [
                    i
                    for i, lane in enumerate(self._lanes)
                    if not lane.group and lane.load < self._rows_per_lane
                ]
                capacity = self._max_batch - self.in_flight
                if not free or capacity <= 0:
                    return
                i = min(free, key=lambda j: self._lanes[j].load)
                lane = self._lanes[i]
                share = -(-(self.in_flight + len(self._queue)) // len(self._lanes))
                room = self._rows_per_lane - lane.load
                want = max(1, min(share - lane.load, capacity, MAX_JOIN, room))
                lane.group = self._take(want)
                lane.group_started = False

    def _take(self, want: int) -> list[_Active]:
        """Up to ``want`` waiting requests that can be prefilled together.

        A prompt longer than one prefill chunk is admitted alone (in chunks);
        shorter ones share one batched chunk of at most ``GROUP_TOKENS``
        tokens (four 512-token chunks), padding included, so that one
        prefill step stays within the activation memory the plan budgets and
        never holds the running streams up for long.
        A prompt that hits the prefix cache is admitted alone too: its group
        starts from the restored KV.
        """
        group: list[_Active] = []
        width = 0
        cache = self.prefix_cache
        while self._queue and len(group) < want:
            req = self._queue[0]
            if group and cache is not None and cache.would_hit(req.prompt):
                break
            hit = cache.lookup(req.prompt) if cache is not None and not group else None
            n = len(req.prompt) - 1 - (hit.tokens if hit else 0)
            long = n > self._prefill_step or hit is not None
            too_many = (len(group) + 1) * max(width, n) > max(GROUP_TOKENS, self._prefill_step)
            if group and (long or too_many):
                break
            width = max(width, n)
            self._queue.popleft()
            active = _Active(req, self._make_detokenizer(), StopMatcher(req.stop))
            if hit is not None:
                active.prefilled = active.cached = hit.tokens
                active.restore = hit.entry
            if req.cancelled.is_set():
                self._unpin(active)
                self._finish(active, Finish.CANCELLED)
                continue
            group.append(active)
            if long:
                break
        return group

    def _reap(self, lane: _Lane) -> None:
        """Cancelled requests finish now; their rows leave at the lane's next step."""
        for row in lane.rows:
            if not row.done and row.req.cancelled.is_set():
                self._finish(row, Finish.CANCELLED)
        for a in lane.group:
            if not a.done and a.req.cancelled.is_set():
                self._finish(a, Finish.CANCELLED)  # it still joins, and leaves next step
        if lane.group and all(a.done for a in lane.group) and not lane.group_started:
            for a in lane.group:
                self._unpin(a)
            lane.group = []

    def _unpin(self, a: _Active) -> None:
        if a.restore and self.prefix_cache is not None:
            self.prefix_cache.unpin(a.restore)
        a.restore = 0

    def _keep(self, lane: _Lane, evict: list[int]) -> None:
        """Decide which of the lane's finished rows the prefix cache keeps."""
        cache = self.prefix_cache
        for i, row in enumerate(lane.rows):
            if not row.done or cache is None or row.reason not in (Finish.STOP, Finish.LENGTH):
                continue
            if len(lane.store) >= MAX_STORE:
                break
            tokens = row.req.prompt + row.generated[: row.fed]
            kept = cache.store(tokens, MAX_EVICT - len(evict))
            if kept is not None:
                entry, evicted = kept
                evict.extend(evicted)
                lane.store.append((i, entry))

    def _step_for(self, index: int, lane: _Lane) -> Step | None:
        if lane.busy:
            return None
        # Indices are those of the rows every rank holds now, so they are
        # taken only when a step is made (or the lane empties).
        evict: list[int] = []
        self._keep(lane, evict)
        lane.remove.extend(i for i, row in enumerate(lane.rows) if row.done)
        lane.rows = [r for r in lane.rows if not r.done]
        remove = tuple(lane.remove)
        store = tuple(lane.store)
        lane.store.clear()
        pending = any(a.to_prefill for a in lane.group)
        if pending and (not lane.rows or not lane.last_prefill):
            lane.remove.clear()
            lane.last_prefill = True
            new = not lane.group_started
            lane.group_started = True
            first = lane.group[0]
            restore = (first.restore, first.cached) if new and first.restore else None
            step = Step(
                index,
                prefill=True,
                chunk=tuple(tuple(self._feed(a)) for a in lane.group),
                new_group=new,
                remove=remove,
                store=store,
                evict=tuple(evict),
                restore=restore,
                trim=self._trim(lane),
                row_trims=self._row_trims(lane),
            )
            self._unpin(first)
            return step
        join = lane.group if lane.group and not pending else []
        if not lane.rows and not join:
            if store or evict:
                # The lane empties: its last rows leave now, kept in the prefix cache.
                lane.remove.clear()
                return Step(
                    index,
                    prefill=False,
                    remove=remove,
                    store=store,
                    evict=tuple(evict),
                    trim=self._trim(lane),
                    row_trims=self._row_trims(lane),
                )
            return None
        lane.remove.clear()
        lane.last_prefill = False
        lane.launched = time.monotonic()
        if not join and self.drafter is not None:
            verify = self._verify_step(index, lane, remove, store, tuple(evict))
            if verify is not None:
                return verify
        tokens = [r.generated[-1] for r in lane.rows] + [a.req.prompt[-1] for a in join]
        for r in lane.rows:
            r.fed += 1
        if join:
            lane.rows.extend(join)
            lane.group = []
        lane.in_flight += 1
        return Step(
            index,
            prefill=False,
            tokens=tuple(tokens),
            join=tuple(a.req.sampling for a in join),
            remove=remove,
            store=store,
            evict=tuple(evict),
            trim=self._trim(lane),
            row_trims=self._row_trims(lane),
        )

    def _chained_step(self) -> Step | None:
        """The next decode step of the one lane at work, on its tokens in flight.

        Only when nothing else waits to happen: no other lane at work, no
        request waiting or being admitted, and every row still running (a row
        that finished, or was cancelled, leaves only in a step made once the
        lane's tokens are all in).
        """
        if not self._chain or self._queue:
            return None
        at_work = [i for i, lane in enumerate(self._lanes) if lane.active]
        if len(at_work) != 1:
            return None
        index = at_work[0]
        lane = self._lanes[index]
        if (
            lane.in_flight != 1
            or lane.group
            or lane.remove
            or lane.store
            or lane.trim
            or lane.row_trims
            or lane.proposal is not None
            or not lane.rows
            or any(r.done or r.req.cancelled.is_set() for r in lane.rows)
        ):
            return None
        if self.drafter is not None and not self.drafter.all_resting(
            [id(r) for r in lane.rows], len(lane.rows)
        ):
            return None  # the next step may be a verify step: it needs the tokens
        for r in lane.rows:
            r.fed += 1
        lane.in_flight += 1
        return Step(index, prefill=False, tokens=(0,) * len(lane.rows), chained=True)

    def _trim(self, lane: _Lane) -> int:
        trim, lane.trim = lane.trim, 0
        return trim

    def _row_trims(self, lane: _Lane) -> tuple[int, ...]:
        rows, lane.row_trims = lane.row_trims, ()
        return rows

    def _verify_step(
        self,
        index: int,
        lane: _Lane,
        remove: tuple[int, ...],
        store: tuple[tuple[int, int], ...],
        evict: tuple[int, ...],
    ) -> Step | None:
        """A verify step of the lane's rows, or None when none drafts now.

        Each row drafts its own k (0: it takes the target's next token, as in
        a plain step); the step is as wide as the most. Drafts never reach
        past a request's ``max_tokens``. Rows are verified together only when
        all are greedy or all sampled (the last rank returns tokens or
        probability rows for the whole step).
        """
        rows = lane.rows
        if len({r.req.sampling.temperature > 0 for r in rows}) != 1:
            return None
        began = time.monotonic()
        counts = [
            min(
                self.drafter.draft_count(id(r), r.req.sampling, len(rows)),
                r.req.max_tokens - len(r.generated) - 1,
            )
            for r in rows
        ]
        if max(counts) < 1:
            return None
        proposals: list[Any] = []
        for row, k in zip(rows, counts, strict=True):
            if k < 1:
                proposals.append(None)
                continue
            proposal = self.drafter.propose(
                id(row), row.req.prompt + row.generated, k, row.req.sampling
            )
            if proposal is None:
                return None  # the draft failed: drafting is off, this step decodes plainly
            proposals.append(proposal)
        width = 1 + max(len(p.drafts) for p in proposals if p is not None)
        tokens: list[int] = []
        for row, proposal in zip(rows, proposals, strict=True):
            drafts = proposal.drafts if proposal is not None else []
            # A row with fewer drafts repeats its last token: those positions are dropped.
            tokens += [row.generated[-1], *drafts]
            tokens += [row.generated[-1]] * (width - 1 - len(drafts))
        lane.proposal = proposals
        lane.in_flight += 1
        lane.launched = time.monotonic()
        lane.drafting = began
        return Step(
            index,
            prefill=False,
            tokens=tuple(tokens),
            remove=remove,
            store=store,
            evict=evict,
            width=width,
            trim=self._trim(lane),
            row_trims=self._row_trims(lane),
            probs=rows[0].req.sampling.temperature > 0,
        )

    def _on_verify(self, lane: _Lane, step: Step, result: list[Any]) -> None:
        """Accept what the target agrees with, row by row; the rest leaves every
        stage's caches at the lane's next step."""
        proposals, lane.proposal = lane.proposal, None
        width = step.width
        trims: list[int] = []
        produced = 0
        for i, (row, proposal) in enumerate(zip(lane.rows, proposals, strict=True)):
            part = result[i * width : (i + 1) * width]
            tokens = self.drafter.accept(id(row), proposal, part, sampled=step.probs)
            if proposal is not None:
                self.drafter.row_verified(id(row), len(proposal.drafts), len(tokens) - 1)
            produced += len(tokens)
            # The caches now hold the last token and every position fed; they
            # keep the drafts that became generated tokens (a draft that ended
            # the request with a stop token or string did not).
            kept = 0
            for j, token in enumerate(tokens):
                if row.done:
                    break
                before = len(row.generated)
                self._accept(row, token)
                if j < len(tokens) - 1 and len(row.generated) > before:
                    kept += 1
            row.fed += 1 + kept
            trims.append(width - 1 - kept)
        # The whole cycle, drafting included: what it replaces is chained plain steps.
        self.drafter.step_verified(
            len(lane.rows), width - 1, lane.arrived - lane.drafting, produced
        )
        lane.trim = min(trims)
        if max(trims) > lane.trim:
            lane.row_trims = tuple(t - lane.trim for t in trims)

    def _feed(self, a: _Active) -> list[int]:
        chunk = a.to_prefill[: self._prefill_step]
        a.prefilled += len(chunk)
        return chunk

    def on_tokens(self, step: Step, tokens: list[Any]) -> None:
        lane = self._lanes[step.lane]
        lane.in_flight -= 1
        now = time.monotonic()
        # What one plain token costs is the time between two steps' tokens: a
        # chained step was launched before the tokens it follows came in.
        since = max(lane.arrived, lane.launched)
        lane.arrived = now
        if step.width > 1:
            self._on_verify(lane, step, tokens)
            return
        if self.drafter is not None and not step.join:
            self.drafter.plain_step(now - since, len(tokens))
        first = len(lane.rows) - len(step.join)
        for i, (row, token) in enumerate(zip(lane.rows, tokens, strict=True)):
            if i >= first and not row.done:
                self.ttfts.append(now - row.req.submitted)
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
        for lane in self._lanes:
            for active in lane.rows + lane.group:
                self._finish(active, Finish.ERROR, error)
        self._lanes = [_Lane() for _ in self._lanes]
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
        drafted, accepted = (0, 0)
        if self.drafter is not None:
            drafted, accepted = self.drafter.usage(id(active))
            self.drafter.release(id(active))
        req.events.put(
            Done(
                reason,
                len(req.prompt),
                len(active.generated),
                error,
                cached_tokens=active.cached,
                drafted_tokens=drafted,
                accepted_tokens=accepted,
            )
        )
        active.done = True
        active.reason = reason
        self._unpin(active)
