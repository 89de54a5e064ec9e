"""The head's index of the prefix KV cache: which token sequences every stage keeps.

When a request finishes, every stage may keep the KV of the tokens it fed
(its prompt and what it generated) for its own layers, under an entry id the
head picks. A new prompt that starts with the tokens of an entry restores
that entry's KV on every stage, trimmed to the shared prefix, and only the
rest of the prompt is prefilled. The head alone decides: which finished rows
become entries, which entry a prompt hits, and which entries are evicted
(least recently used first) to stay within the byte budget. Its decisions
travel in the step's control vector, so every stage stores, restores and
evicts the same entries in the same order. Nothing here touches MLX.

The budget is per stage: an entry costs, on every stage, its tokens times
that stage's KV bytes per token; the head counts the stage that holds the
most (``token_bytes``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    entry: int
    tokens: int  # prompt tokens whose KV is restored


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    pins: int = 0


class PrefixCache:
    """Entries by id, least recently used first, within ``budget_bytes`` per stage.

    ``max_tokens`` bounds an entry (sliding-window models: an entry longer
    than the window has overwritten the start of its own prefix and could
    only be reused whole); ``min_tokens`` is the shortest prefix worth a hit.
    """

    def __init__(
        self,
        budget_bytes: int,
        token_bytes: int,
        *,
        max_tokens: int | None = None,
        min_tokens: int = 1,
    ):
        if token_bytes <= 0:
            raise ValueError("token_bytes must be positive")
        self.budget_bytes = max(0, budget_bytes)
        self.token_bytes = token_bytes
        self.max_tokens = max_tokens
        self.min_tokens = max(1, min_tokens)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 1
        self.lookups = 0
        self.hits = 0
        self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes >= self.token_bytes

    @property
    def tokens(self) -> int:
        # One more token than the entry's list: the cache may hold the row's
        # last fed token too (see ``store``).
        return sum(len(e.tokens) + 1 for e in self._entries.values())

    @property
    def bytes(self) -> int:
        return self.tokens * self.token_bytes

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def would_hit(self, prompt: list[int]) -> bool:
        """Whether ``lookup`` would find a prefix (without counting or pinning)."""
        return self.enabled and self._best(prompt)[1] >= self.min_tokens

    def _best(self, prompt: list[int]) -> tuple[int | None, int]:
        best, best_len = None, 0
        limit = len(prompt) - 2
        for entry_id, entry in self._entries.items():
            n = _common_prefix(entry.tokens, prompt, limit)
            if n > best_len:
                best, best_len = entry_id, n
        return best, best_len

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The entry sharing the longest prefix with ``prompt``, pinned until ``unpin``.

        At least the prompt's last two tokens are left to compute: one to
        prefill (a group starts with a prefill step) and the last one, fed
        when the request joins its lane and samples its first token.
        """
        if not self.enabled:
            return None
        self.lookups += 1
        best, best_len = self._best(prompt)
        if best is None or best_len < self.min_tokens:
            return None
        self._entries.move_to_end(best)
        self._entries[best].pins += 1
        self.hits += 1
        self.hit_tokens += best_len
        return Hit(best, best_len)

    def unpin(self, entry: int) -> None:
        e = self._entries.get(entry)
        if e is not None and e.pins > 0:
            e.pins -= 1

    def store(self, tokens: list[int], max_evict: int) -> tuple[int, list[int]] | None:
        """A new entry for ``tokens`` and the entries evicted to make room.

        None when it is not worth keeping or cannot fit: too short, too long
        for a sliding window, bigger than the budget, already held whole by
        another entry, or more than ``max_evict`` evictions would be needed.
        """
        if not self.enabled or len(tokens) < self.min_tokens:
            return None
        if self.max_tokens is not None and len(tokens) + 1 > self.max_tokens:
            return None
        key = tuple(tokens)
        need = (len(key) + 1) * self.token_bytes
        if need > self.budget_bytes:
            return None
        evict: list[int] = []
        covered = [i for i, e in self._entries.items() if e.tokens[: len(key)] == key]
        if covered:
            self._entries.move_to_end(covered[0])
            return None
        # An entry that is a prefix of the new one is superseded by it.
        evict.extend(
            i for i, e in self._entries.items() if key[: len(e.tokens)] == e.tokens and not e.pins
        )
        free = self.budget_bytes - self.bytes
        free += sum((len(self._entries[i].tokens) + 1) * self.token_bytes for i in evict)
        for i, e in self._entries.items():
            if free >= need:
                break
            if i in evict or e.pins:
                continue
            evict.append(i)
            free += (len(e.tokens) + 1) * self.token_bytes
        if free < need or len(evict) > max_evict:
            return None
        for i in evict:
            del self._entries[i]
        entry_id = self._next_id
        self._next_id = self._next_id % 0x7FFFFFFF + 1
        self._entries[entry_id] = _Entry(key)
        return entry_id, evict

    def clear(self) -> list[int]:
        """Forget every entry (the stages lost theirs); the ids forgotten."""
        ids = list(self._entries)
        self._entries.clear()
        return ids


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
