"""Attention masks of Pomona's batched caches: the plain causal mask (MLX's fused
kernel) while no row is padded, mlx-lm's array mask as soon as one is."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from pomona.worker.lockstep import _note_padding
from pomona.worker.shard import cache_kind


def _filled(tokens: int) -> KVCache:
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 2, tokens, 4)), mx.zeros((1, 2, tokens, 4)))
    return c


def test_one_unpadded_request_masks_with_causal_and_none() -> None:
    c = BatchKVCache.merge([_filled(5)])
    _note_padding([c])
    assert c.make_mask(16) == "causal"
    assert c.make_mask(1) is None
    assert c.make_mask(16, return_array=True).shape == (1, 1, 16, 21)
    assert cache_kind(c) == ("KVCache", None)  # still the kind of mlx-lm's cache


def test_a_padded_row_gets_mlx_lms_array_mask_until_it_leaves() -> None:
    c = BatchKVCache.merge([_filled(5), _filled(3)])  # the second row is left padded
    _note_padding([c])
    mask = c.make_mask(1)
    assert isinstance(mask, mx.array)
    assert mask[1].tolist() == [[[False, False, True, True, True, True]]]
    c.filter(mx.array([0]))  # the padded row leaves
    _note_padding([c])
    assert c.make_mask(1) is None


def test_a_cache_that_was_never_noted_keeps_the_array_mask() -> None:
    c = BatchKVCache.merge([_filled(5)])
    assert isinstance(c.make_mask(16), mx.array)
