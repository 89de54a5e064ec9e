"""One pipeline step, run by every rank in lockstep.

The head (rank 0) decides each step and sends a small control vector down the
pipeline ahead of the activations; every other rank receives it from the
previous rank and forwards it before computing, so the control message never
waits on compute. The last rank samples and returns the tokens to the head,
its neighbour on the ring. Only the head and the last rank ever see tokens.

A step is either a prefill chunk of the one request being admitted (its own
KV cache, batch of one) or a decode step of the running batch (one token per
row, batched KV caches with left padding, as mlx-lm's batch generator keeps
them). When a newcomer's prefill samples its first token it joins the batch
on every rank at once; rows that finished leave it at the start of the next
step. Every rank applies the same changes in the same order, so the rows of
the caches on every rank always describe the same requests.

Ranks enter a session only when there is work and leave it when the head says
so: a rank waiting inside an MLX collective busy-spins, so idle ranks wait on
their control plane instead.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from pomona.worker.shard import (
    LoadedShard,
    alias_caches,
    cache_kind,
    make_stage_cache,
    stage_caches,
)

log = logging.getLogger(__name__)

MAX_ROWS = 64
_HEADER = 16
CTRL_LEN = _HEADER + MAX_ROWS

OP_LEAVE = 0
OP_PREFILL = 1
OP_DECODE = 2


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Step:
    """What every rank does in one step.

    ``prefill``: feed ``tokens`` of the request being admitted through its own
    cache (``new_sequence`` starts it; ``sample`` asks for its first token, after
    which it joins the batch). Otherwise a decode step: one token per row of
    the batch. ``remove`` lists batch rows that leave before the step runs.
    ``tokens`` are known to the head only; other ranks learn their count.
    """

    tokens: Sequence[int]
    prefill: bool
    sample: bool = True
    new_sequence: bool = False
    sampling: Sampling = Sampling()
    remove: tuple[int, ...] = ()


def _f2i(x: float) -> int:
    return int(struct.unpack("<i", struct.pack("<f", x))[0])


def _i2f(x: int) -> float:
    return float(struct.unpack("<f", struct.pack("<i", x))[0])


def encode_ctrl(step: Step | None) -> list[int]:
    """The control vector for a step; None means leave the session."""
    ctrl = [0] * CTRL_LEN
    if step is None:
        return ctrl
    if len(step.remove) > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows can leave in one step")
    s = step.sampling
    ctrl[:13] = [
        OP_PREFILL if step.prefill else OP_DECODE,
        len(step.tokens),
        int(step.sample),
        int(step.new_sequence),
        _f2i(s.temperature),
        _f2i(s.top_p),
        s.top_k,
        _f2i(s.min_p),
        s.seed & 0x7FFFFFFF,
        (s.seed >> 31) & 0x7FFFFFFF,
        len(step.remove),
        0,
        0,
    ]
    ctrl[_HEADER : _HEADER + len(step.remove)] = list(step.remove)
    return ctrl


def decode_ctrl(ctrl: Sequence[int]) -> Step | None:
    """The step (with placeholder tokens) a control vector describes."""
    op = int(ctrl[0])
    if op == OP_LEAVE:
        return None
    sampling = Sampling(
        temperature=_i2f(int(ctrl[4])),
        top_p=_i2f(int(ctrl[5])),
        top_k=int(ctrl[6]),
        min_p=_i2f(int(ctrl[7])),
        seed=int(ctrl[8]) | (int(ctrl[9]) << 31),
    )
    n_remove = int(ctrl[10])
    return Step(
        tokens=[0] * int(ctrl[1]),
        prefill=op == OP_PREFILL,
        sample=bool(ctrl[2]),
        new_sequence=bool(ctrl[3]),
        sampling=sampling,
        remove=tuple(int(x) for x in ctrl[_HEADER : _HEADER + n_remove]),
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
class StageEngine:
    """Runs this rank's part of each step of a session."""

    shard: LoadedShard
    prefill_caches: list[Any] = field(init=False)
    batch_caches: list[Any] | None = field(default=None, init=False)
    rows: list[_Row] = field(default_factory=list, init=False)
    pending: _Row | None = field(default=None, init=False)
    # When the step in progress began (monotonic), None outside a session:
    # the runner's watchdog reads it from another thread.
    busy_since: float | None = field(default=None, init=False)
    _batch_rows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.spec = self.shard.spec
        self.model = self.shard.model
        self.prefill_caches = make_stage_cache(self.model, self.spec)
        self._kinds = [cache_kind(c) for c in self.prefill_caches]
        self._ctrl_template = mx.zeros((CTRL_LEN,), dtype=mx.int32)

    # -- sessions -------------------------------------------------------------

    def head_session(
        self, next_step: Callable[[], Step | None], on_tokens: Callable[[list[int]], None]
    ) -> None:
        """Run steps chosen by ``next_step`` until it returns None."""
        while True:
            step = next_step()
            self.busy_since = time.monotonic()
            if self.spec.world_size > 1:
                ctrl = mx.array(encode_ctrl(step), dtype=mx.int32)
                mx.async_eval(mx.distributed.send(ctrl, 1))
            if step is None:
                mx.synchronize()
                self.reset()
                return
            tokens = self.run_step(step, list(step.tokens))
            self.busy_since = None
            if tokens is not None:
                on_tokens(tokens)

    def follower_session(self) -> None:
        """Follow the head's steps until it says leave."""
        rank = self.spec.rank
        while True:
            self.busy_since = time.monotonic()
            ctrl = mx.distributed.recv_like(self._ctrl_template, rank - 1)
            mx.eval(ctrl)
            if not self.spec.is_last:
                mx.async_eval(mx.distributed.send(ctrl, rank + 1))
            step = decode_ctrl(cast(list[int], ctrl.tolist()))
            if step is None:
                mx.synchronize()
                self.reset()
                return
            self.run_step(step, list(step.tokens))

    def reset(self) -> None:
        """Forget every sequence (a session ended)."""
        self.busy_since = None
        self.batch_caches = None
        self.rows = []
        self.pending = None
        self._batch_rows = 0
        self.prefill_caches = make_stage_cache(self.model, self.spec)
        mx.clear_cache()

    # -- one step -------------------------------------------------------------

    def run_step(self, step: Step, tokens: list[int]) -> list[int] | None:
        """Run this rank's layers for one step; the head gets the sampled tokens."""
        if step.remove:
            self._remove(step.remove)
        if step.prefill:
            if step.new_sequence:
                self.prefill_caches = make_stage_cache(self.model, self.spec)
                self.pending = _row(step.sampling) if self.spec.is_last else None
            inputs = mx.array(tokens, dtype=mx.int32)[None]  # (1, L)
            result = self._forward(inputs, self.prefill_caches, step.sample, [self.pending])
            if step.sample:
                self._join()
            return result
        rows = self._batch_rows
        inputs = mx.array(tokens if self.spec.is_first else [0] * rows, dtype=mx.int32)
        return self._forward(inputs[:, None], self.batch_caches, True, self.rows)  # (B, 1)

    def _forward(
        self, inputs: mx.array, caches: list[Any] | None, sample: bool, rows: Sequence[Any]
    ) -> list[int] | None:
        spec = self.spec
        out = self.model(inputs, cache=caches)
        owned = stage_caches(caches or [], spec)
        if spec.is_last:
            if not sample:
                mx.eval([c.state for c in owned])
                return None
            logits = out[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if all(r.sampling.temperature == 0 for r in rows):
                tokens = mx.argmax(logprobs, axis=-1)
            else:
                tokens = mx.concatenate([r.sample(logprobs[i : i + 1]) for i, r in enumerate(rows)])
            tokens = tokens.astype(mx.int32)  # (B,)
            if spec.world_size > 1:
                tokens = mx.distributed.send(tokens, 0)
            mx.eval(tokens)
            return cast(list[int], tokens.tolist()) if spec.is_first else None
        sent = self.shard.sent
        mx.eval(sent[-1], [c.state for c in owned])
        sent.clear()
        if spec.is_first and sample:
            template = mx.zeros((inputs.shape[0],), dtype=mx.int32)
            tokens = mx.distributed.recv_like(template, spec.world_size - 1)
            mx.eval(tokens)
            return cast(list[int], tokens.tolist())
        return None

    def _join(self) -> None:
        """The admitted request becomes the last row of the batch."""
        spec = self.spec
        single = {i: self.prefill_caches[i] for i in range(spec.start, spec.end)}
        merged = {i: type(c).merge([c]) for i, c in single.items()}
        if self.batch_caches is None:
            self.batch_caches = alias_caches(merged, self._kinds, spec)
        else:
            for i, c in merged.items():
                self.batch_caches[i].extend(c)
        self._batch_rows += 1
        if spec.is_last and self.pending is not None:
            self.rows.append(self.pending)
            self.pending = None
        self.prefill_caches = make_stage_cache(self.model, spec)

    def _remove(self, remove: Sequence[int]) -> None:
        keep = [i for i in range(self._batch_rows) if i not in set(remove)]
        self._batch_rows = len(keep)
        if self.spec.is_last:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.batch_caches = None
            return
        assert self.batch_caches is not None
        index = mx.array(keep, dtype=mx.int32)
        for c in stage_caches(self.batch_caches, self.spec):
            c.filter(index)
