"""Tensor parallel steps: every rank runs a slice of every layer, in lockstep.

mlx-lm's ``shard()`` splits each layer's attention heads and MLP width across
the group; two ``all_sum``s per layer join the slices, after which every rank
holds the same hidden state. So every rank embeds the step's tokens and ends
with the same logits: the head (rank 0) samples, and no token needs a hop.

The head still owns the schedule. Each step starts with one ``all_sum`` of the
control vector followed by the step's tokens, zeros on every other rank: a
broadcast in one collective. A step with more tokens than fit inline (a
prefill chunk) sends the rest in a second ``all_sum`` of the size the control
vector announced. There is one lane: a step already keeps every rank busy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import mlx.core as mx

from pomona.worker.lockstep import (
    CTRL_LEN,
    StageEngine,
    Step,
    _Lane,
    decode_ctrl,
    encode_ctrl,
)
from pomona.worker.shard import stage_caches

INLINE_TOKENS = 64  # tokens carried in the control collective itself
BROADCAST_LEN = CTRL_LEN + INLINE_TOKENS


def step_token_ids(step: Step) -> list[int]:
    """Every token the step feeds, in row order (prefill rows one after another)."""
    if step.prefill:
        return [t for row in step.chunk for t in row]
    return list(step.tokens)


def with_token_ids(step: Step, ids: Sequence[int]) -> Step:
    """``step`` (decoded from its control vector) with its real tokens."""
    if not step.prefill:
        return replace(step, tokens=tuple(ids))
    rows, at = [], 0
    for row in step.chunk:
        rows.append(tuple(ids[at : at + len(row)]))
        at += len(row)
    return replace(step, chunk=tuple(rows))


def encode_broadcast(step: Step | None) -> tuple[list[int], list[int]]:
    """The head's control collective, and the tokens that did not fit in it."""
    vector = encode_ctrl(step) + [0] * INLINE_TOKENS
    ids = [] if step is None else step_token_ids(step)
    vector[CTRL_LEN : CTRL_LEN + min(len(ids), INLINE_TOKENS)] = ids[:INLINE_TOKENS]
    return vector, ids[INLINE_TOKENS:]


class TensorEngine(StageEngine):
    """Runs this rank's slice of every layer for each step of a session."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._feeds = True  # every rank embeds the tokens
        self._samples = self.spec.is_first  # every rank has the logits; the head samples
        self._broadcast_template = mx.zeros((BROADCAST_LEN,), dtype=mx.int32)

    @property
    def lane_count(self) -> int:
        return 1

    @property
    def can_chain(self) -> bool:
        return False  # every rank must be sent a step's tokens: they are known first

    def _announce(self, step: Step | None) -> None:
        vector, rest = encode_broadcast(step)
        # One evaluation each, in order: MLX orders independent outputs of one
        # evaluation as it likes, and the followers join them in this order.
        mx.async_eval(mx.distributed.all_sum(mx.array(vector, dtype=mx.int32)))
        if rest:
            mx.async_eval(mx.distributed.all_sum(mx.array(rest, dtype=mx.int32)))

    def _follow(self) -> Step | None:
        vector = mx.distributed.all_sum(self._broadcast_template)
        mx.eval(vector)
        values = cast(list[int], vector.tolist())
        step = decode_ctrl(values[:CTRL_LEN])
        if step is None:
            return None
        count = len(step_token_ids(step))
        ids = values[CTRL_LEN : CTRL_LEN + min(count, INLINE_TOKENS)]
        if count > INLINE_TOKENS:
            rest = mx.distributed.all_sum(mx.zeros((count - INLINE_TOKENS,), dtype=mx.int32))
            ids += cast(list[int], rest.tolist())
        return with_token_ids(step, ids)

    def _decode(self, inputs: mx.array, lane: _Lane) -> mx.array | None:
        logits = self.model(inputs, cache=lane.caches)[:, -1, :]
        owned = stage_caches(lane.caches or [], self.spec)
        if self._samples:
            tokens = self._sample(logits, lane)
            mx.async_eval(tokens, [c.state for c in owned])
            return tokens
        # Not sampled here, but evaluated: the last layer's all_sums are part of it.
        mx.eval(logits, [c.state for c in owned])
        return None


def make_engine(shard: Any, watch: Any) -> StageEngine:
    """The engine for a loaded shard: tensor slices or a range of layers."""
    if shard.spec.tensor:
        return TensorEngine(shard, watch)
    return StageEngine(shard, watch)
