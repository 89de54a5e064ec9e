"""Joining an MLX group: a backend that cannot form says so as a group failure; the
ring's last rank learns when its peers listen."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from modelfactory import make_model

from pomona import rpc
from pomona.config import WorkerConfig
from pomona.local import free_worker_ports
from pomona.v1 import worker_pb2, worker_pb2_grpc
from pomona.worker.daemon import WorkerDaemon
from pomona.worker.group import GroupError, join_group, wait_for_listeners
from pomona.worker.runner_process import State

LOOPBACK = "127.0.0.1"


def test_a_backend_this_mlx_lacks_is_a_group_error_in_mlx_words() -> None:
    with pytest.raises(GroupError, match=r"init\(backend='jaccl'\) raised: Cannot initialize"):
        join_group("jaccl-ring", 0, 2, timeout=30)


def test_an_init_that_never_returns_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # As JACCL waiting on a coordinator no rank can reach: init blocks.
    release = threading.Event()
    monkeypatch.setattr(mx.distributed, "init", lambda **_: release.wait())
    try:
        with pytest.raises(GroupError, match=r"init\(backend='nccl'\) did not return within 0 s"):
            join_group("nccl", 1, 2, timeout=0.2)
    finally:
        release.set()


def test_the_last_rank_asking_before_a_peers_load_arrives_is_answered_when_it_does(
    tmp_path: Path,
) -> None:
    """A peer still fetching its stage has no load yet: its daemon holds the last rank's
    question (``wait_for_load``) and answers once that load's runner is joining."""
    make_model(tmp_path / "models" / "tiny", "llama", num_layers=2, shards=1)

    async def scenario() -> None:
        port = free_worker_ports(set())
        daemon = WorkerDaemon(
            WorkerConfig(
                name="peer",
                host=LOOPBACK,
                port=port,
                addresses=(LOOPBACK,),
                state_dir=tmp_path / "state",
                model_dirs=(tmp_path / "models",),
                cache_dir=tmp_path / "cache",
                spare_runner=False,
            )
        )
        server = rpc.aio_server()
        worker_pb2_grpc.add_WorkerServicer_to_server(daemon, server)
        rpc.add_port(server, f"{LOOPBACK}:{port}")
        await server.start()
        address = f"{LOOPBACK}:{port}"
        try:
            async with rpc.aio_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as plain:
                    async for _ in stub.WatchShard(worker_pb2.WatchShardRequest(load_id="l1")):
                        pass
                assert plain.value.code() == grpc.StatusCode.NOT_FOUND
                # Rank 1 of 2 (the ring's last) asks rank 0, whose load is not there yet.
                asking = asyncio.create_task(
                    asyncio.to_thread(
                        wait_for_listeners, (address, "rank-1"), (), "l1", 1, "", 120.0
                    )
                )

                async def held() -> None:
                    while not daemon.waiting_for_load:
                        await asyncio.sleep(0.05)

                await asyncio.wait_for(held(), 30)  # the question waits at the peer
                assert not asking.done()
                load = worker_pb2.LoadRequest(
                    load_id="l1", model="tiny", start_layer=0, end_layer=2, rank=0,
                    world_size=2, ring_hosts=[f"{LOOPBACK}:{port + 1}", f"{LOOPBACK}:1"],
                    workers=[address, "rank-1"], backend="ring", coordinator="c",
                )  # fmt: skip
                await stub.Load(load, timeout=30)
                await asyncio.wait_for(asking, 120)  # rank 0 loaded and listens
                state = daemon.runner.info.state if daemon.runner else None
                assert state is State.CONNECTING
                await stub.Unload(worker_pb2.UnloadRequest(load_id="l1", coordinator="c"))
        finally:
            await daemon.shutdown()
            await server.stop(None)

    asyncio.run(scenario())
