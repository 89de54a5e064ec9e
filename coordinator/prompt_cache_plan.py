"""The planner's budget for the prefix KV cache of a placed model.

Each stage keeps finished requests' KV for its own layers within one byte
budget, the same on every stage (the head evicts for all of them). By default
the budget is half of the memory the plan leaves free on the tightest stage
after weights, the planned KV cache and activations, at most
``DEFAULT_MAX_BYTES``; ``--prompt-cache-gb`` sets it, and is refused when a
stage has not that much left. The head counts every entry at the KV bytes
per token of the stage holding the most, so no stage exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pomona.model_profile import ModelProfile
from pomona.units import format_bytes

DEFAULT_SHARE = 0.5
DEFAULT_MAX_BYTES = 8 * 10**9
# Without a plan (an explicit --layers split) the free memory is not known.
UNPLANNED_BYTES = 10**9


class PromptCacheError(ValueError):
    pass


@dataclass(frozen=True)
class PromptCacheBudget:
    bytes: int  # per stage; 0: off
    token_bytes: int  # KV bytes per cached token on the stage that holds the most


def token_bytes(profile: ModelProfile, ranges: Sequence[tuple[int, int]]) -> int:
    """KV bytes per token of the stage whose layers keep the most."""
    per_layer = profile.kv_bytes_per_token_per_layer
    return max((sum(per_layer[start:end]) for start, end in ranges), default=0)


def prompt_cache_budget(
    profile: ModelProfile,
    ranges: Sequence[tuple[int, int]],
    free_bytes: Sequence[tuple[str, int]] | None,
    requested_gb: float | None,
) -> PromptCacheBudget:
    """The per-stage budget for stages ``ranges``, each with (name, bytes left) if planned."""
    per_token = token_bytes(profile, ranges)
    if requested_gb is not None:
        wanted = int(requested_gb * 1e9)
        for name, free in free_bytes or ():
            if wanted > free:
                raise PromptCacheError(
                    f"--prompt-cache-gb {requested_gb:g} does not fit: {name} has "
                    f"{format_bytes(max(free, 0))} left after weights and KV cache"
                )
        return PromptCacheBudget(wanted, per_token)
    if free_bytes is None:
        return PromptCacheBudget(UNPLANNED_BYTES, per_token)
    tightest = min((free for _, free in free_bytes), default=0)
    return PromptCacheBudget(
        max(0, min(int(tightest * DEFAULT_SHARE), DEFAULT_MAX_BYTES)), per_token
    )
