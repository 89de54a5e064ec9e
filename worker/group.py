"""Joining the runner's MLX distributed group, bounded in time.

``mx.distributed.init`` either raises (JACCL without a device, or on a machine whose
MLX has no such backend) or blocks until every rank has joined (JACCL waiting on its
coordinator forever when a peer cannot reach it). Either way the runner must say that
the *group* failed, not the model, so that the coordinator can form it again over the
ring.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
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


# The gap between a rank saying it is joining and its listening socket being up.
LISTEN_GRACE_S = 0.05
# A peer's NOT_FOUND after this long means its daemon waited for the load: ask again at once.
WAITED_S = 1.0


def wait_for_listeners(
    workers: tuple[str, ...],
    node_ids: tuple[str, ...],
    load_id: str,
    rank: int,
    cluster_config: str,
    timeout: float,
) -> None:
    """Return once every other rank of the load is joining its ring group (listening).

    MLX's ring forms like this: every rank but the last first *accepts* its left
    neighbour (waiting as long as it takes), then connects to its right one; the
    last rank connects first, to rank 0, and its connect gives up after five
    tries 1, 2, 4 and 8 s apart. Ranks finish loading at different times (a
    slow disk, a slow first import, a larger stage), so a last rank that joined
    as soon as it had loaded would wait a second or more for nothing, and one
    15 s ahead of rank 0 would fail the group. The last rank therefore starts
    the ring only when every other rank's daemon says its runner is joining:
    then each connect of the chain finds its peer listening. A peer still
    fetching its stage has no load yet: its daemon holds the question until the
    load arrives (``wait_for_load``), so the answer comes when it does.
    """
    import grpc

    from pomona import rpc
    from pomona.security import Auth
    from pomona.v1 import worker_pb2, worker_pb2_grpc

    auth = Auth.load(Path(cluster_config)) if cluster_config else Auth.none()
    targets = node_ids or ("",) * len(workers)
    deadline = time.monotonic() + timeout
    pause = 0.05  # between asks of a rank whose load has not arrived; grows to 1 s
    joining = (worker_pb2.SHARD_STATE_CONNECTING, worker_pb2.SHARD_STATE_READY)
    for peer, (address, target) in enumerate(zip(workers, targets, strict=True)):
        if peer == rank:
            continue
        with rpc.channel(address, auth, target) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"rank {peer} ({address}) did not join within {timeout:.0f} s"
                    )
                asked = time.monotonic()
                try:
                    for status in stub.WatchShard(
                        worker_pb2.WatchShardRequest(load_id=load_id, wait_for_load=True),
                        timeout=left,
                    ):
                        if status.state in joining:
                            break
                        if status.state == worker_pb2.SHARD_STATE_FAILED:
                            raise RuntimeError(f"rank {peer} ({address}) failed: {status.error}")
                    else:
                        time.sleep(pause)  # the stream ended before joining: ask again
                        pause = min(1.0, pause * 2)
                        continue
                    break
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue  # the peer waited for its load until our deadline
                    if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                        raise RuntimeError(
                            f"cannot ask rank {peer} ({address}) whether it is joining: "
                            f"{rpc.describe_error(e, address)}"
                        ) from e
                    if time.monotonic() - asked < WAITED_S:
                        # Its load has not arrived yet (still fetching) and its daemon
                        # did not wait for it (unreachable, or one that cannot).
                        time.sleep(pause)
                        pause = min(1.0, pause * 2)
    time.sleep(LISTEN_GRACE_S)


def in_background(call: Callable[[], None]) -> Callable[[], None]:
    """``call`` started in a thread; returns the call that waits for it and raises its error.

    A daemon thread: a runner that fails meanwhile must not wait for it to exit.
    """
    done = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # raised in the waiting thread, below
            error.append(e)
        done.set()

    threading.Thread(target=run, daemon=True, name="background").start()

    def wait() -> None:
        done.wait()
        if error:
            raise error[0]

    return wait
