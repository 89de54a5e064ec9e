"""One pipeline step, run by every rank in lockstep.

The head (rank 0) decides each step and sends a small control vector down the
pipeline ahead of the activations; every other rank receives it from the
previous rank and forwards it before computing, so the control message never
waits on compute. The last rank samples and returns the tokens to the head,
its neighbour on the ring. Only the head and the last rank ever see tokens.

Ranks enter a session only when there is work and leave it when the head says
so: a rank waiting inside an MLX collective busy-spins, so idle ranks wait on
their control plane instead.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler
from pomona.worker.shard import LoadedShard, make_stage_cache, stage_caches

log = logging.getLogger(__name__)

CTRL_LEN = 12
OP_LEAVE = 0
OP_STEP = 1


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

    ``tokens`` are known to the head only; other ranks learn their count.
    ``new_sequence`` starts fresh KV caches (and, on the last rank, a fresh
    sampler seeded with ``sampling.seed``). ``sample`` asks the last rank for
    the next token; prefill chunks that only fill the caches do not.
    """

    tokens: Sequence[int]
    sample: bool
    new_sequence: bool = False
    sampling: Sampling = Sampling()


def _f2i(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<f", struct.pack("<i", x))[0]


def encode_ctrl(step: Step | None) -> list[int]:
    """The control vector for a step; None means leave the session."""
    if step is None:
        return [OP_LEAVE] + [0] * (CTRL_LEN - 1)
    s = step.sampling
    return [
        OP_STEP,
        len(step.tokens),
        int(step.sample),
        int(step.new_sequence),
        _f2i(s.temperature),
        _f2i(s.top_p),
        s.top_k,
        _f2i(s.min_p),
        s.seed & 0x7FFFFFFF,
        (s.seed >> 31) & 0x7FFFFFFF,
        0,
        0,
    ]


def decode_ctrl(ctrl: Sequence[int]) -> tuple[int, int, Step | None]:
    """(op, n_tokens, step without tokens) from a control vector."""
    op, n = int(ctrl[0]), int(ctrl[1])
    if op == OP_LEAVE:
        return op, 0, None
    sampling = Sampling(
        temperature=_i2f(int(ctrl[4])),
        top_p=_i2f(int(ctrl[5])),
        top_k=int(ctrl[6]),
        min_p=_i2f(int(ctrl[7])),
        seed=int(ctrl[8]) | (int(ctrl[9]) << 31),
    )
    return (
        op,
        n,
        Step(tokens=(), sample=bool(ctrl[2]), new_sequence=bool(ctrl[3]), sampling=sampling),
    )


class StageEngine:
    """Runs this rank's part of each step of a session."""

    def __init__(self, shard: LoadedShard):
        self.shard = shard
        self.spec = shard.spec
        self.model = shard.model
        self.caches: list[Any] = make_stage_cache(self.model, self.spec)
        self._sampler: Callable[[mx.array], mx.array] = make_sampler(0.0)
        self._ctrl_template = mx.zeros((CTRL_LEN,), dtype=mx.int32)
        self._token_template = mx.zeros((1,), dtype=mx.int32)

    # -- the head's side ----------------------------------------------------

    def head_session(
        self, next_step: Callable[[], Step | None], on_token: Callable[[int], None]
    ) -> None:
        """Run steps chosen by ``next_step`` until it returns None."""
        while True:
            step = next_step()
            ctrl = encode_ctrl(step)
            if self.spec.world_size > 1:
                mx.async_eval(mx.distributed.send(mx.array(ctrl, dtype=mx.int32), 1))
            if step is None:
                mx.synchronize()
                return
            token = self.run_step(step, list(step.tokens))
            if token is not None:
                on_token(token)

    # -- every other rank -----------------------------------------------------

    def follower_session(self) -> None:
        """Follow the head's steps until it says leave."""
        rank = self.spec.rank
        while True:
            ctrl = mx.distributed.recv_like(self._ctrl_template, rank - 1)
            mx.eval(ctrl)
            if not self.spec.is_last:
                mx.async_eval(mx.distributed.send(ctrl, rank + 1))
            _, n, step = decode_ctrl(ctrl.tolist())
            if step is None:
                mx.synchronize()
                return
            self.run_step(step, [0] * n)

    # -- one step -------------------------------------------------------------

    def run_step(self, step: Step, tokens: list[int]) -> int | None:
        """Run this rank's layers for one step; the head gets the sampled token."""
        spec = self.spec
        if step.new_sequence:
            self.caches = make_stage_cache(self.model, spec)
            if spec.is_last:
                s = step.sampling
                self._sampler = make_sampler(s.temperature, s.top_p, s.min_p, top_k=s.top_k)
                if s.temperature > 0:
                    mx.random.seed(s.seed)
        inputs = mx.array(tokens, dtype=mx.int32)[None]  # (1, L)
        out = self.model(inputs, cache=self.caches)
        if spec.is_last:
            if not step.sample:
                mx.eval([c.state for c in stage_caches(self.caches, spec)])
                return None
            logits = out[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            token = self._sampler(logprobs).astype(mx.int32)  # (1,)
            if spec.world_size > 1:
                token = mx.distributed.send(token, 0)
            mx.eval(token)
            return int(token.item()) if spec.is_first else None
        sent = self.shard.sent
        mx.eval(sent[-1], [c.state for c in stage_caches(self.caches, spec)])
        sent.clear()
        if spec.is_first and step.sample:
            token = mx.distributed.recv_like(self._token_template, spec.world_size - 1)
            mx.eval(token)
            return int(token.item())
        return None
