"""Joining the runner's MLX distributed group, bounded in time.

``mx.distributed.init`` either raises (JACCL without a device, or on a machine whose
MLX has no such backend) or blocks until every rank has joined (JACCL waiting on its
coordinator forever when a peer cannot reach it). Either way the runner must say that
the *group* failed, not the model, so that the coordinator can form it again over the
ring.
"""

from __future__ import annotations

import threading
from typing import Any

from pomona.backends import mlx_backend


class GroupError(RuntimeError):
    """The MLX group did not form: the backend, not the shard, is at fault."""


def join_group(backend: str, rank: int, world_size: int, timeout: float) -> Any:
    """The group, joined as ``rank`` of ``world_size``; GroupError if it did not form."""
    import mlx.core as mx

    call = f"mx.distributed.init(backend={mlx_backend(backend)!r})"
    done = threading.Event()
    result: dict[str, Any] = {}

    def init() -> None:
        try:
            result["group"] = mx.distributed.init(backend=mlx_backend(backend), strict=True)
        except Exception as e:  # reported below, in the caller's thread
            result["error"] = e
        done.set()

    # A daemon thread: an init that never returns must not keep the runner alive.
    threading.Thread(target=init, daemon=True, name="mlx-init").start()
    if not done.wait(timeout):
        raise GroupError(f"{call} did not return within {timeout:.0f} s")
    if "error" in result:
        error = result["error"]
        raise GroupError(f"{call} raised: {error}") from error
    group = result["group"]
    if (group.rank(), group.size()) != (rank, world_size):
        raise GroupError(
            f"joined the {backend} group as rank {group.rank()} of {group.size()}, "
            f"expected {rank} of {world_size}"
        )
    return group
