"""The stages' side of the prefix cache: keeping and restoring mlx-lm KV caches.

Each stage keeps, per prefix-cache entry, single-row caches of its own layers
(extracted from a lane's batched caches when the head says so); a hit builds
fresh caches from the first tokens of an entry. The head's index of entries
is ``prefix_cache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.models.cache import KVCache, RotatingKVCache


def restore_prefix(kept: Sequence[Any], tokens: int) -> list[Any]:
    """Fresh single-row caches holding the first ``tokens`` of a kept entry.

    The kept arrays are shared, never written: merging into a batch copies them.
    A sliding-window cache is only kept while it has not wrapped (the head
    never stores longer entries), so trimming it is exact.
    """
    out: list[Any] = []
    for c in kept:
        if isinstance(c, RotatingKVCache):
            if not c.is_trimmable() or tokens > c.offset:
                raise ValueError("a sliding-window cache that wrapped cannot be trimmed")
            r = RotatingKVCache(c.max_size, c.keep)
            r.keys, r.values, r.offset, r._idx = c.keys, c.values, tokens, tokens
            out.append(r)
        elif isinstance(c, KVCache):
            if tokens > c.offset:
                raise ValueError(f"a kept cache of {c.offset} tokens cannot restore {tokens}")
            k = KVCache()
            k.keys, k.values, k.offset = c.keys, c.values, tokens
            out.append(k)
        else:
            raise ValueError(f"{type(c).__name__} cannot be kept in the prefix cache")
    return out


def prefix_cacheable(kinds: Sequence[tuple[str, Any]]) -> tuple[bool, int | None]:
    """Whether a model's caches can be kept and trimmed, and the smallest window.

    Full attention (``KVCache``) and sliding windows (``RotatingKVCache``)
    can; recurrent state (``ArraysCache``) and others cannot be trimmed.
    """
    names = {name for name, _ in kinds}
    windows = [size for name, size in kinds if name == "RotatingKVCache" and size]
    return names <= {"KVCache", "RotatingKVCache"}, min(windows) if windows else None
