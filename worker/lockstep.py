"""One pipeline step, run by every rank in lockstep.

The head (rank 0) decides each step and sends a small control vector down the
pipeline ahead of the activations; every other rank receives it from the
previous rank and forwards it before computing, so the control message never
waits on compute. The last rank samples and returns the tokens to the head,
its neighbour on the ring. Only the head and the last rank ever see tokens.

The running requests are split into *lanes*, one per rank: independent
batches, each with its own batched KV caches (left padding, as mlx-lm's batch
generator keeps them). While the last rank works on lane A's step the head
already runs lane B's, so with as many lanes as ranks every Mac is busy at once
instead of in turn. The head launches a step and collects its tokens only
after launching the next one: a receive is never outstanding while it computes
(the ring backend's receive spins).

With one lane at work (one stream, or every stream in one batch) the head
does not wait for a step's tokens before making the lane's next decode step:
it builds that step on the tokens still in flight (MLX arrays the ring has
yet to deliver) and announces it, then evaluates it, which waits for those
tokens, and only then hands the earlier step's tokens to the scheduler.
Building the graph, encoding the control vector, detokenizing and streaming
so happen while the rest of the pipeline computes, off the critical path,
as mlx-lm's generator does with ``async_eval``. (The head evaluates each step
before going on rather than leaving it to run in the background: a step in
flight when the ring fails takes the runner down with SIGSEGV instead of
raising.) Such a *chained* step is made only when the lane's rows stay as
they are; a row that finished is computed one step too many, and its token
dropped.

A step belongs to one lane and is either a prefill chunk of the group of
requests being admitted to it (batched, right padded like mlx-lm's prompt
batches, in caches of their own), or a decode step of the lane's rows. The
admitted group joins the lane at the start of a decode step, each joiner
feeding its last prompt token in it, as mlx-lm does, so greedy output matches
single-process mlx-lm token for token. Rows that finished leave at the start
of their lane's next step. Every rank applies the same changes in the same
order, so the cache rows on every rank always describe the same requests.

Tensor parallelism (every rank a slice of every layer) runs the same loop with
its own broadcast and decode: ``worker/tensor.py``.

Ranks enter a session only when there is work and leave it when the head says
so: a rank waiting inside an MLX collective busy-spins, so idle ranks wait on
their control plane instead.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import make_sampler

from pomona.worker.prefix_kv import restore_prefix
from pomona.worker.shard import (
    LoadedShard,
    alias_caches,
    cache_kind,
    make_stage_cache,
    stage_caches,
)
from pomona.worker.speculative import sampling_probs

log = logging.getLogger(__name__)

MAX_ROWS = 64  # rows that can leave one lane in one step
MAX_JOIN = 16  # requests admitted to a lane together
_HEADER = 16
_REMOVE = _HEADER
_LENGTHS = _REMOVE + MAX_ROWS
_JOIN = _LENGTHS + MAX_JOIN
_SAMPLING_INTS = 6
MAX_STORE = 16  # finished rows kept in the prefix cache in one step
MAX_EVICT = 32  # prefix-cache entries evicted in one step
_STORE = _JOIN + MAX_JOIN * _SAMPLING_INTS
_EVICT = _STORE + 2 * MAX_STORE
_ROW_TRIMS = _EVICT + MAX_EVICT
CTRL_LEN = _ROW_TRIMS + MAX_ROWS

OP_LEAVE = 0
OP_PREFILL = 1
OP_DECODE = 2
# In the last header slot of every control vector: a rank that reads anything
# else has lost track of the message stream and says so instead of guessing.
_MAGIC_AT = _HEADER - 1
MAGIC = 0x504D4E41
_MAX_WIDTH = 33  # tokens per row of a verify step: the last one and up to 32 drafts


class Desynchronized(RuntimeError):
    """A rank read something other than a control vector where one was due."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Step:
    """What every rank does in one step of one lane.

    Prefill (``chunk``): the next tokens of each request of the lane's
    admission group, one row each (``new_group`` starts the group's caches).
    Decode (``tokens``): one token per row of the lane, followed by the last
    prompt token of each request in ``join``, which joins the lane first.
    ``remove`` lists lane rows that leave before the step runs. Tokens are
    known to the head only; the other ranks learn their counts.

    Prefix cache (``prefix_cache``): ``evict`` lists entries every stage
    drops, ``store`` pairs (row, entry) of leaving rows whose KV every stage
    keeps under that entry, and ``restore`` (entry, tokens) starts a new
    group of one request from the first ``tokens`` of an entry's KV.
    """

    lane: int
    prefill: bool
    tokens: tuple[int, ...] = ()
    chunk: tuple[tuple[int, ...], ...] = ()
    new_group: bool = False
    join: tuple[Sampling, ...] = ()
    remove: tuple[int, ...] = ()
    store: tuple[tuple[int, int], ...] = ()
    evict: tuple[int, ...] = ()
    restore: tuple[int, int] | None = None
    # Head only, never sent: the tokens are those of the lane's step still in
    # flight (``tokens`` holds placeholders of the same count).
    chained: bool = False
    # Speculative decoding (``speculative``): a verify step feeds ``width``
    # tokens per row (the last token, then the drafts) and returns the
    # target's ``width`` tokens per row, or its probability rows (``probs``)
    # for sampled rows; ``trim`` positions of the lane's caches, rejected
    # drafts of its previous step, are dropped before anything else.
    width: int = 1
    trim: int = 0
    probs: bool = False
    # Rows of a verify step rejected different numbers of drafts: beyond
    # ``trim``, row i drops ``row_trims[i]`` more positions, rolled into its
    # left padding (as mlx-lm's batch caches finalize right padding).
    row_trims: tuple[int, ...] = ()


def _f2i(x: float) -> int:
    return int(struct.unpack("<i", struct.pack("<f", x))[0])


def _i2f(x: int) -> float:
    return float(struct.unpack("<f", struct.pack("<i", x))[0])


def _encode_sampling(s: Sampling) -> list[int]:
    return [
        _f2i(s.temperature),
        _f2i(s.top_p),
        s.top_k,
        _f2i(s.min_p),
        s.seed & 0x7FFFFFFF,
        (s.seed >> 31) & 0x7FFFFFFF,
    ]


def _decode_sampling(v: Sequence[int]) -> Sampling:
    return Sampling(
        temperature=_i2f(int(v[0])),
        top_p=_i2f(int(v[1])),
        top_k=int(v[2]),
        min_p=_i2f(int(v[3])),
        seed=int(v[4]) | (int(v[5]) << 31),
    )


def encode_ctrl(step: Step | None) -> list[int]:
    """The control vector for a step; None means leave the session."""
    ctrl = [0] * CTRL_LEN
    ctrl[_MAGIC_AT] = MAGIC
    if step is None:
        return ctrl
    if len(step.remove) > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows can leave a lane in one step")
    if max(len(step.chunk), len(step.join)) > MAX_JOIN:
        raise ValueError(f"at most {MAX_JOIN} requests can join a lane together")
    if len(step.store) > MAX_STORE or len(step.evict) > MAX_EVICT:
        raise ValueError(
            f"at most {MAX_STORE} stores and {MAX_EVICT} evictions of the prefix cache in one step"
        )
    if step.restore is not None and not (step.prefill and step.new_group and len(step.chunk) == 1):
        raise ValueError("only a new prefill group of one request restores a prefix")
    if step.width > 1 and (step.prefill or step.join):
        raise ValueError("a verify step neither prefills nor admits requests")
    if not 1 <= step.width <= _MAX_WIDTH or not 0 <= step.trim < _MAX_WIDTH:
        raise ValueError(f"a verify step feeds at most {_MAX_WIDTH} tokens per row")
    if len(step.row_trims) > MAX_ROWS or not all(0 <= t < _MAX_WIDTH for t in step.row_trims):
        raise ValueError(f"at most {MAX_ROWS} rows trim fewer than {_MAX_WIDTH} positions each")
    restore = step.restore or (0, 0)
    ctrl[11:15] = [step.width - 1, step.trim, int(step.probs), len(step.row_trims)]
    ctrl[:11] = [
        OP_PREFILL if step.prefill else OP_DECODE,
        step.lane,
        len(step.tokens),
        len(step.chunk),
        int(step.new_group),
        len(step.remove),
        len(step.join),
        len(step.store),
        len(step.evict),
        restore[0],
        restore[1],
    ]
    ctrl[_REMOVE : _REMOVE + len(step.remove)] = list(step.remove)
    ctrl[_LENGTHS : _LENGTHS + len(step.chunk)] = [len(row) for row in step.chunk]
    for i, s in enumerate(step.join):
        at = _JOIN + i * _SAMPLING_INTS
        ctrl[at : at + _SAMPLING_INTS] = _encode_sampling(s)
    ctrl[_STORE : _STORE + 2 * len(step.store)] = [x for pair in step.store for x in pair]
    ctrl[_EVICT : _EVICT + len(step.evict)] = list(step.evict)
    ctrl[_ROW_TRIMS : _ROW_TRIMS + len(step.row_trims)] = list(step.row_trims)
    return ctrl


def decode_ctrl(ctrl: Sequence[int]) -> Step | None:
    """The step (with placeholder tokens) a control vector describes."""
    op = int(ctrl[0])
    n_rows, n_remove, n_join = int(ctrl[3]), int(ctrl[5]), int(ctrl[6])
    n_store, n_evict, n_trims = int(ctrl[7]), int(ctrl[8]), int(ctrl[14])
    if (
        len(ctrl) != CTRL_LEN
        or int(ctrl[_MAGIC_AT]) != MAGIC
        or op not in (OP_LEAVE, OP_PREFILL, OP_DECODE)
        or not (0 <= n_rows <= MAX_JOIN and 0 <= n_join <= MAX_JOIN and 0 <= n_remove <= MAX_ROWS)
        or not (0 <= n_store <= MAX_STORE and 0 <= n_evict <= MAX_EVICT)
        or not 0 <= int(ctrl[2]) <= MAX_ROWS * MAX_JOIN
        or not (0 <= int(ctrl[11]) < _MAX_WIDTH and 0 <= int(ctrl[12]) < _MAX_WIDTH)
        or not 0 <= n_trims <= MAX_ROWS
    ):
        raise Desynchronized(
            "received a malformed control message: the stages of this pipeline disagree "
            f"on what they exchange (header {[int(x) for x in ctrl[:8]]})"
        )
    if op == OP_LEAVE:
        return None
    return Step(
        lane=int(ctrl[1]),
        prefill=op == OP_PREFILL,
        tokens=(0,) * int(ctrl[2]),
        chunk=tuple((0,) * int(n) for n in ctrl[_LENGTHS : _LENGTHS + n_rows]),
        new_group=bool(ctrl[4]),
        join=tuple(
            _decode_sampling(ctrl[_JOIN + i * _SAMPLING_INTS : _JOIN + (i + 1) * _SAMPLING_INTS])
            for i in range(n_join)
        ),
        remove=tuple(int(x) for x in ctrl[_REMOVE : _REMOVE + n_remove]),
        store=tuple(
            (int(ctrl[_STORE + 2 * i]), int(ctrl[_STORE + 2 * i + 1])) for i in range(n_store)
        ),
        evict=tuple(int(x) for x in ctrl[_EVICT : _EVICT + n_evict]),
        restore=(int(ctrl[9]), int(ctrl[10])) if int(ctrl[9]) else None,
        width=int(ctrl[11]) + 1,
        trim=int(ctrl[12]),
        probs=bool(ctrl[13]),
        row_trims=tuple(int(x) for x in ctrl[_ROW_TRIMS : _ROW_TRIMS + n_trims]),
    )


@dataclass
class _Row:
    """The last rank's sampling state of one batch row."""

    sampling: Sampling
    sampler: Callable[[mx.array], mx.array]
    steps: int = 0

    def sample(self, logprobs: mx.array) -> mx.array:
        if self.sampling.temperature > 0:
            # A key per request and step: the same seed gives the same text
            # whatever else shares the batch.
            mx.random.seed((self.sampling.seed * 1_000_003 + self.steps) % (1 << 63))
        self.steps += 1
        return self.sampler(logprobs)


def _row(sampling: Sampling) -> _Row:
    s = sampling
    return _Row(s, make_sampler(s.temperature, s.top_p, s.min_p, top_k=s.top_k))


@dataclass
class _Lane:
    """One independent batch: its rows' caches and its admission group's."""

    caches: list[Any] | None = None
    n: int = 0
    rows: list[_Row] = field(default_factory=list)  # last rank only
    group: list[Any] | None = None


class StepTrace:
    """Per-step timings of this rank, for profiling (``POMONA_STEP_TRACE=DIR``).

    One tab-separated line per step: start and end (monotonic seconds), the
    kind, the tokens it fed, its lane, and whether it was chained. Written when
    a session ends, so tracing costs a list append per step.
    """

    def __init__(self, folder: str, rank: int):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"rank{rank}.tsv")
        self.lines: list[str] = []

    @staticmethod
    def from_env(rank: int) -> StepTrace | None:
        folder = os.environ.get("POMONA_STEP_TRACE", "")
        return StepTrace(folder, rank) if folder else None

    def add(self, began: float, kind: str, step: Step | None, tokens: int) -> None:
        lane = -1 if step is None else step.lane
        chained = int(step is not None and step.chained)
        self.lines.append(
            f"{began:.6f}\t{time.monotonic():.6f}\t{kind}\t{tokens}\t{lane}\t{chained}"
        )

    def flush(self) -> None:
        if self.lines:
            with open(self.path, "a") as f:
                f.write("\n".join(self.lines) + "\n")
            self.lines = []


def _kind(step: Step | None) -> str:
    if step is None:
        return "leave"
    if step.prefill:
        return "prefill"
    return "verify" if step.width > 1 else "decode"


@dataclass
class StepWatch:
    """How long this rank may wait inside one step before a peer counts as frozen.

    A dead peer makes the ring raise at once; a frozen one (stopped, asleep,
    its cable pulled) makes it wait forever. The bound follows the measured
    pace of the pipeline as this rank sees it, in seconds per token of a
    step (waiting for the other stages included), times the tokens of the step
    at hand, times ``factor``; never below ``floor``. Until a step has been
    measured, ``first`` applies. The watchdog reads ``since`` and ``budget``
    from another thread.
    """

    first: float = 60.0
    floor: float = 5.0
    factor: float = 3.0
    since: float | None = None
    budget: float = 0.0
    _paces: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    _tokens: int = 1

    def begin(self, tokens: int | None = None) -> None:
        """A wait starts (``tokens``: the step's size, when known)."""
        self.since = time.monotonic()
        self.sized(tokens)

    def sized(self, tokens: int | None) -> None:
        """The step's size became known while waiting."""
        size = max(tokens or 0, self._tokens, 1)
        if self._paces:
            self.budget = max(self.floor, self.factor * max(self._paces) * size)
        else:
            self.budget = max(self.first, self.floor)

    def end(self, tokens: int) -> None:
        """The step is done: remember its pace."""
        if self.since is not None:
            self._paces.append((time.monotonic() - self.since) / max(tokens, 1))
        self._tokens = max(tokens, 1)
        self.since = None

    def idle(self) -> None:
        self.since = None

    def overdue(self, now: float) -> float:
        """Seconds spent waiting beyond the budget (<= 0 while on time)."""
        since = self.since
        return -1.0 if since is None else now - since - self.budget


class _CausalBatchKVCache(BatchKVCache):
    """mlx-lm's batched KV cache, with the plain causal mask while no row is padded.

    ``BatchKVCache`` always masks with an array (for its left padding), which
    keeps MLX's attention off its fused causal kernel: on a GPU that made a
    4,096-token prefill of one request through Pomona about twice as slow as
    mlx-lm's, whose single-request cache masks with "causal". When no row is
    left padded (one request, or rows that joined together) the two masks are
    the same, so the cheap one is used. ``unpadded`` is kept by the engine,
    which makes every change to the padding (a join, a removal, a padded
    prefill), so building a step never waits on the device to know it.
    """

    unpadded = False

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:
        if self.unpadded and not return_array and not kwargs.get("window_size"):
            return "causal" if N > 1 else None
        return super().make_mask(N, return_array=return_array, **kwargs)


def _note_padding(caches: Sequence[Any]) -> None:
    """Mark which of these batched caches have no padded row (see above), reading
    every layer's padding from the device at once."""
    batched = []
    for c in caches:
        if type(c) is BatchKVCache:
            c.__class__ = _CausalBatchKVCache
        if isinstance(c, _CausalBatchKVCache):
            batched.append(c)
    if not batched:
        return
    padded = cast(list[bool], mx.stack([mx.any(c.left_padding) for c in batched]).tolist())
    for c, p in zip(batched, padded, strict=True):
        c.unpadded = not p


def warm_up_steps(prefill_step: int, widths: Sequence[int] = ()) -> list[Step]:
    """The steps of a warm-up session (``StageEngine.warm_up``): two full prefill
    chunks of one request (the second over a cache that holds the first), the
    decode step it joins in, a plain decode step, then a verify step of every
    width in ``widths``."""
    chunk = ((0,) * max(prefill_step, 1),)
    steps = [
        Step(0, prefill=True, chunk=chunk, new_group=True),
        Step(0, prefill=True, chunk=chunk),
        Step(0, prefill=False, tokens=(0,), join=(Sampling(),)),
        Step(0, prefill=False, tokens=(0,)),
    ]
    return steps + [Step(0, prefill=False, tokens=(0,) * w, width=w) for w in widths]


def step_tokens(step: Step, lane_rows: int = 0) -> int:
    """The tokens one step feeds through a stage: its size for the watchdog."""
    if step.prefill:
        return sum(len(row) for row in step.chunk) or 1
    return max(len(step.tokens), lane_rows + len(step.join) - len(step.remove), 1)


@dataclass
class StageEngine:
    """Runs this rank's part of each step of a session."""

    shard: LoadedShard
    watch: StepWatch = field(default_factory=StepWatch)
    lanes: dict[int, _Lane] = field(default_factory=dict, init=False)
    # Prefix-cache entries: this stage's single-row caches of its layers, by id.
    # They outlive sessions; only the head's control vector adds or drops them.
    prefix: dict[int, list[Any]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.spec = self.shard.spec
        self.model = self.shard.model
        self._kinds = [cache_kind(c) for c in make_stage_cache(self.model, self.spec)]
        self.kinds = tuple(self._kinds)  # every layer's, held here or not
        self._ctrl_template = mx.zeros((CTRL_LEN,), dtype=mx.int32)
        # Control vectors of plain decode steps, by (lane, rows): most steps.
        self._plain_ctrl: dict[tuple[int, int], mx.array] = {}
        # Which rank embeds real tokens and which samples (holds the rows' samplers).
        self._feeds = self.spec.is_first
        self._samples = self.spec.is_last
        self.trace = StepTrace.from_env(self.spec.rank)

    @property
    def lane_count(self) -> int:
        """Lanes that keep every rank busy: one per rank."""
        return self.spec.world_size

    @property
    def can_chain(self) -> bool:
        """Whether the head may launch a lane's decode step on tokens in flight."""
        return True

    def can_batch(self) -> bool:
        """Whether this model's layers take several requests in one step.

        Builds (never evaluates, so nothing is sent) two-token steps of two
        and of three rows: MLX checks shapes while the graph is built. Some
        mlx-lm models (gemma2) reshape attention scores so that a batched
        mask broadcasts only when the rows happen to equal the KV heads; they
        are served one request per lane.
        """
        try:
            for rows in (2, 3):
                self.model(mx.zeros((rows, 2), dtype=mx.int32), cache=self._fresh(rows))
        except ValueError as e:
            log.warning("this model cannot decode several requests together: %s", e)
            return False
        finally:
            self.shard.sent.clear()
        return True

    # -- sessions -------------------------------------------------------------

    def head_session(
        self,
        next_step: Callable[[], Step | None],
        on_tokens: Callable[[Step, list[int]], None],
    ) -> None:
        """Run steps chosen by ``next_step`` until it has none and none is out.

        ``next_step`` returns None when no lane can take a step now; the
        oldest step in flight is then collected, which frees its lane.
        """
        in_flight: deque[tuple[Step, mx.array]] = deque()
        watch = self.watch
        trace = self.trace

        def collect() -> None:
            step, tokens = in_flight.popleft()
            size = len(step.tokens) + len(step.join)
            watch.begin(size)
            began = time.monotonic()
            mx.eval(tokens)
            watch.end(size)
            if trace is not None:
                trace.add(began, "collect", step, size)
            on_tokens(step, cast(list[int], tokens.tolist()))

        while True:
            step = next_step()
            if step is None and in_flight:
                collect()
                continue
            watch.begin(None if step is None else step_tokens(step))
            began = time.monotonic()
            if self.spec.world_size > 1:
                self._announce(step)
            if step is None:
                mx.synchronize()
                self.reset()
                return
            # A chained step feeds the tokens of its lane's step in flight.
            fed = next((t for s, t in reversed(in_flight) if s.lane == step.lane), None)
            tokens = self.run_step(step, fed if step.chained else None)
            watch.end(step_tokens(step))
            if trace is not None:
                trace.add(began, _kind(step), step, step_tokens(step))
            if tokens is not None:
                in_flight.append((step, tokens))
            # One step per lane in flight, and one chained behind it.
            if len(in_flight) > self.lane_count:
                collect()

    def warm_up(self, steps: Sequence[Step]) -> None:
        """Run ``steps`` as a session of their own, dropping what they return.

        Every rank so meets these step shapes at load: an accelerator compiles
        the kernels of each new shape on first use (seconds on MLX's CUDA
        backend), which would otherwise fall in a user's first request.
        """
        todo = deque(steps)
        self.head_session(lambda: todo.popleft() if todo else None, lambda step, tokens: None)

    def follower_session(self) -> None:
        """Follow the head's steps until it says leave."""
        watch = self.watch
        trace = self.trace
        while True:
            watch.begin()
            began = time.monotonic()
            step = self._follow()
            if step is None:
                mx.synchronize()
                self.reset()
                return
            lane = self.lanes.get(step.lane)
            size = step_tokens(step, lane.n if lane is not None else 0)
            watch.sized(size)
            if trace is not None:
                trace.add(began, "wait", step, 0)
                began = time.monotonic()
            self.run_step(step)
            watch.end(size)
            if trace is not None:
                trace.add(began, _kind(step), step, size)

    def _announce(self, step: Step | None) -> None:
        """The head tells rank 1 the step; it forwards it down the pipeline."""
        mx.async_eval(mx.distributed.send(self._ctrl(step), 1))

    def _ctrl(self, step: Step | None) -> mx.array:
        plain = (
            step is not None
            and not step.prefill
            and step.width == 1
            and not (
                step.join or step.remove or step.store or step.evict or step.trim or step.row_trims
            )
        )
        if not plain:
            return mx.array(encode_ctrl(step), dtype=mx.int32)
        assert step is not None
        key = (step.lane, len(step.tokens))
        ctrl = self._plain_ctrl.get(key)
        if ctrl is None:
            ctrl = self._plain_ctrl[key] = mx.array(encode_ctrl(step), dtype=mx.int32)
        return ctrl

    def _follow(self) -> Step | None:
        """The step the head announced, passed on to the next rank first."""
        rank = self.spec.rank
        ctrl = mx.distributed.recv_like(self._ctrl_template, rank - 1)
        mx.eval(ctrl)
        if not self.spec.is_last:
            mx.async_eval(mx.distributed.send(ctrl, rank + 1))
        return decode_ctrl(cast(list[int], ctrl.tolist()))

    def reset(self) -> None:
        """Forget every sequence (a session ended).

        MLX's buffer cache is kept, as mlx-lm's server keeps it between
        requests: the next session reuses the buffers of this one's caches and
        activations instead of allocating them again (within MLX's cache
        limit; its size shows as the runner's MLX cache in ``pomona status``).
        """
        self.watch.idle()
        self.lanes = {}
        if self.trace is not None:
            self.trace.flush()

    # -- one step -------------------------------------------------------------

    def run_step(self, step: Step, fed: mx.array | None = None) -> mx.array | None:
        """Run this rank's layers for one step.

        On the head a decode step returns the sampled tokens, not yet
        evaluated: the head collects them later. A chained step feeds ``fed``,
        the tokens of the lane's step in flight.
        """
        lane = self.lanes.setdefault(step.lane, _Lane())
        if step.trim or step.row_trims:
            self._trim(lane, step.trim, step.row_trims)
        group = None
        if step.prefill and (step.new_group or lane.group is None):
            # Before any eviction of this step, which may drop the restored entry.
            group = self._fresh(len(step.chunk), step.restore)
        for entry in step.evict:
            self.prefix.pop(entry, None)
        for row, entry in step.store:
            self._store(lane, row, entry)
        if step.remove:
            self._remove(lane, step.remove)
        if step.prefill:
            if group is not None:
                lane.group = group
            assert lane.group is not None
            self._prefill(lane.group, step.chunk)
            return None
        if step.join:
            self._join(lane, step.join)
        if lane.n == 0:
            return None  # the lane emptied: a step of prefix-cache bookkeeping only
        assert lane.caches is not None
        width = step.width
        if step.chained and fed is not None:
            inputs = fed
        else:
            inputs = mx.array(step.tokens if self._feeds else [0] * lane.n * width, dtype=mx.int32)
        if width > 1:
            return self._verify(inputs.reshape(lane.n, width), lane, step.probs)
        return self._decode(inputs[:, None], lane)  # (B, 1)

    def _fresh(self, n: int, restore: tuple[int, int] | None = None) -> list[Any]:
        """Batched caches for ``n`` new requests: empty, or one restored prefix."""
        spec = self.spec
        if restore is not None:
            entry, tokens = restore
            kept = self.prefix.get(entry)
            if kept is None:
                raise Desynchronized(
                    f"the head restores prefix-cache entry {entry}, which this stage does not hold"
                )
            restored = restore_prefix(kept, tokens)
            layers = range(spec.start, spec.end)
            merged = {i: type(c).merge([c]) for i, c in zip(layers, restored, strict=True)}
        else:
            singles = [make_stage_cache(self.model, spec) for _ in range(n)]
            merged = {
                i: type(singles[0][i]).merge([s[i] for s in singles])
                for i in range(spec.start, spec.end)
            }
        _note_padding(list(merged.values()))
        return alias_caches(merged, self._kinds, spec)

    def _store(self, lane: _Lane, row: int, entry: int) -> None:
        """Keep a copy of one lane row's KV, for this stage's layers, as ``entry``."""
        assert lane.caches is not None and 0 <= row < lane.n
        kept = [c.extract(row) for c in stage_caches(lane.caches, self.spec)]
        mx.eval([c.state for c in kept])
        self.prefix[entry] = kept

    def _prefill(self, caches: list[Any], chunk: Sequence[Sequence[int]]) -> None:
        """Feed one chunk of each admitted request (right padded, as mlx-lm)."""
        spec = self.spec
        lengths = [len(row) for row in chunk]
        width = max(lengths)
        padding = [width - n for n in lengths]
        owned = stage_caches(caches, spec)
        if max(padding) > 0:
            for c in owned:
                c.prepare(lengths=lengths, right_padding=padding)
        rows = [list(row) + [0] * pad for row, pad in zip(chunk, padding, strict=True)]
        # Only the caches and what is sent on are evaluated, never the logits.
        self.model(mx.array(rows, dtype=mx.int32), cache=caches)
        self._send_on(owned)
        if max(padding) > 0:
            for c in owned:
                c.finalize()
            mx.eval([c.state for c in owned])
            _note_padding(owned)

    def _join(self, lane: _Lane, join: Sequence[Sampling]) -> None:
        """The lane's admission group becomes the last rows of its batch."""
        spec = self.spec
        group = lane.group if lane.group is not None else self._fresh(len(join))
        lane.group = None
        if lane.caches is None:
            lane.caches = group
        else:
            for mine, theirs in zip(
                stage_caches(lane.caches, spec), stage_caches(group, spec), strict=True
            ):
                mine.extend(theirs)
            _note_padding(stage_caches(lane.caches, spec))
        lane.n += len(join)
        if self._samples:
            lane.rows.extend(_row(s) for s in join)

    def _decode(self, inputs: mx.array, lane: _Lane) -> mx.array | None:
        spec = self.spec
        out = self.model(inputs, cache=lane.caches)
        owned = stage_caches(lane.caches or [], spec)
        if spec.is_last:
            tokens = self._sample(out[:, -1, :], lane)
            if spec.world_size > 1:
                tokens = mx.distributed.send(tokens, 0)
            if spec.is_first:  # one rank: collected later, as on any head
                mx.async_eval(tokens, [c.state for c in owned])
                return tokens
            mx.eval(tokens, [c.state for c in owned])
            return None
        # Evaluated here, on the head too: a step left running in the
        # background when the ring fails (a peer died) takes the runner down
        # with SIGSEGV instead of raising. A chained step so waits here for the
        # tokens it feeds, but its graph was built, and the earlier tokens
        # streamed, while the rest of the pipeline computed.
        self._send_on(owned)
        if spec.is_first:
            template = mx.zeros((inputs.shape[0],), dtype=mx.int32)
            return mx.distributed.recv_like(template, spec.world_size - 1)
        return None

    def _verify(self, inputs: mx.array, lane: _Lane, probs: bool) -> mx.array | None:
        """A verify step (B, W): on the head, the target's W tokens per row
        (B * W,), or its probability rows (B * W, V) for sampled rows."""
        spec = self.spec
        out = self.model(inputs, cache=lane.caches)
        owned = stage_caches(lane.caches or [], spec)
        if spec.is_last:
            if probs:
                result = mx.concatenate(
                    [sampling_probs(out[i], r.sampling) for i, r in enumerate(lane.rows)]
                )
            else:
                result = mx.argmax(out, axis=-1).astype(mx.int32).reshape(-1)
            if spec.world_size > 1:
                result = mx.distributed.send(result, 0)
            mx.eval(result, [c.state for c in owned])
            return result if spec.is_first else None
        self._send_on(owned)
        if spec.is_first:
            count = inputs.shape[0] * inputs.shape[1]
            if probs:
                template = mx.zeros((count, self.vocab_size), dtype=mx.float32)
            else:
                template = mx.zeros((count,), dtype=mx.int32)
            return mx.distributed.recv_like(template, spec.world_size - 1)
        return None

    @property
    def vocab_size(self) -> int:
        config = self.shard.config
        return int(config.get("vocab_size") or config.get("text_config", {})["vocab_size"])

    def _trim(self, lane: _Lane, n: int, rows: Sequence[int] = ()) -> None:
        """Drop the last ``n`` positions of every row of the lane (rejected drafts),
        and ``rows[i]`` more of row i: those roll to the row's front and become
        left padding, which the mask hides (mlx-lm's ``finalize``)."""
        if lane.caches is None:
            return
        owned = stage_caches(lane.caches, self.spec)
        for c in owned:
            if n:
                c.trim(n)
            if any(rows):
                c.prepare(right_padding=list(rows))
                c.finalize()
        if any(rows):
            _note_padding(owned)

    def _sample(self, logits: mx.array, lane: _Lane) -> mx.array:
        """The next token of every row of the lane, from its logits (B, V)."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if all(r.sampling.temperature == 0 for r in lane.rows):
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            tokens = mx.concatenate(
                [r.sample(logprobs[i : i + 1]) for i, r in enumerate(lane.rows)]
            )
        return tokens.astype(mx.int32)  # (B,)

    def _send_on(self, owned: Sequence[Any]) -> None:
        """Evaluate this stage's caches and what it sends to the next stage."""
        sent = self.shard.sent
        mx.eval(sent[-1:], [c.state for c in owned])
        sent.clear()

    def _remove(self, lane: _Lane, remove: Sequence[int]) -> None:
        gone = set(remove)
        keep = [i for i in range(lane.n) if i not in gone]
        lane.n = len(keep)
        if self._samples:
            lane.rows = [lane.rows[i] for i in keep]
        if not keep:
            lane.caches = None
            return
        assert lane.caches is not None
        index = mx.array(keep, dtype=mx.int32)
        owned = stage_caches(lane.caches, self.spec)
        for c in owned:
            c.filter(index)
        _note_padding(owned)
