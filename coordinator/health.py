"""Heartbeats: every member's telemetry stream, probes, and loss detection.

Each member streams a sample a second (``Worker.Telemetry``); the stream is
its heartbeat. A member is lost when its stream breaks (the daemon died, the
connection was refused) or when its samples stop for the heartbeat timeout
and a direct health probe then fails too (a frozen machine, a pulled cable:
TCP only stalls). A runner of the serving pipeline that reports FAILED (it
died, or its watchdog found it stuck) breaks the pipeline without losing the
node. Either way the cluster re-forms (``Cluster.lose``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pomona.coordinator.cluster import Cluster, Member
from pomona.coordinator.monitor import NodeState
from pomona.v1 import worker_pb2

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
# A runner that failed because a peer vanished is a symptom: the cause (a
# runner killed, a node lost) is usually reported within a second. Wait this
# long for it before blaming the runner that saw the peer go.
SYMPTOM_GRACE_S = 2.0
# What a runner reports when a peer failed, not itself: Pomona's own words, and
# MLX's ring's in the stderr of a runner that crashed (SIGSEGV) once a peer's
# socket closed under a pending transfer (the drills saw it when a neighbour
# was killed; the neighbour was then blamed instead of the killed runner).
PEER_SYMPTOMS = (
    "connection to a peer was lost",
    "a peer stopped answering",
    "was closed by the peer",
    "Too many send/recv errors",
)


def peer_symptom(why: str) -> bool:
    """Whether a runner's failure reads as a peer's, not its own."""
    return any(symptom in why for symptom in PEER_SYMPTOMS)


# A member silent for the heartbeat timeout is lost unless it answers this fast:
# a health check takes milliseconds on a LAN.
PROBE_TIMEOUT_S = 1.0
RECONNECT_S = 1.0


class HealthWatcher:
    def __init__(self, cluster: Cluster, heartbeat_timeout: float):
        self.cluster = cluster
        self.heartbeat_timeout = heartbeat_timeout
        self._streams: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Watch every member until cancelled."""
        tick = 0
        try:
            while True:
                for node_id in self.cluster.members:
                    if node_id not in self._streams or self._streams[node_id].done():
                        self._streams[node_id] = asyncio.create_task(self._follow(node_id))
                await self._check(probe_rtt=tick % 2 == 0)
                tick += 1
                await asyncio.sleep(1.0)
        finally:
            for task in self._streams.values():
                task.cancel()
            await asyncio.gather(*self._streams.values(), return_exceptions=True)

    async def _follow(self, node_id: str) -> None:
        """Follow one member's telemetry, reconnecting while it is away."""
        monitor = self.cluster.monitor
        while True:
            member = self.cluster.members[node_id]
            call = member.stub.Telemetry(
                worker_pb2.TelemetryRequest(
                    interval_s=SAMPLE_INTERVAL_S, coordinator=self.cluster.coordinator_id
                )
            )
            try:
                async for sample in call:
                    member = self.cluster.members[node_id]
                    monitor.observe_sample(node_id, sample)
                    self.cluster.returned(member)
                    await self._check_runner(member, sample)
            except grpc.aio.AioRpcError as e:
                member = self.cluster.members[node_id]
                if member.state != "lost" and e.code() != grpc.StatusCode.CANCELLED:
                    await self.cluster.lose(
                        member,
                        f"stopped answering ({e.code().name}: {e.details()})",
                        node_lost=True,
                    )
            finally:
                call.cancel()
            await asyncio.sleep(RECONNECT_S)

    async def _check_runner(self, member: Member, sample: worker_pb2.NodeSample) -> None:
        serving = self.cluster.serving
        shard = sample.shard
        if (
            serving is not None
            and serving.holds(member.node_id)
            and shard.load_id == serving.load_id
            and shard.state in (worker_pb2.SHARD_STATE_FAILED, worker_pb2.SHARD_STATE_STOPPED)
        ):
            why = shard.error or "it stopped"
            if peer_symptom(why):
                await asyncio.sleep(SYMPTOM_GRACE_S)
                if self.cluster.serving is not serving:
                    return  # the cause was found meanwhile
            await self.cluster.lose(member, f"runner failed: {why}", node_lost=False)

    async def _check(self, probe_rtt: bool) -> None:
        """Derive states; a member silent for the heartbeat timeout is probed, then lost."""
        cluster = self.cluster
        healths = cluster.monitor.refresh({m.node_id: m.state for m in cluster.members.values()})
        probes: list[Coroutine[Any, Any, object]] = []
        for node_id, health in healths.items():
            member = cluster.members[node_id]
            silent = cluster.monitor.seen_ago(node_id) >= self.heartbeat_timeout
            if member.state != "lost" and (silent or health.state is NodeState.LOST):
                probes.append(self._probe_or_lose(member))
            elif probe_rtt and member.state != "lost":
                probes.append(self._probe(member))
        await asyncio.gather(*probes)

    async def _probe(self, member: Member) -> bool:
        stub = health_pb2_grpc.HealthStub(self.cluster.channel(member.address))
        started = time.monotonic()
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        self.cluster.monitor.observe_rtt(member.node_id, time.monotonic() - started)
        return True

    async def _probe_or_lose(self, member: Member) -> None:
        if await self._probe(member):
            return
        silent = self.cluster.monitor.seen_ago(member.node_id)
        with contextlib.suppress(KeyError):
            await self.cluster.lose(
                member,
                f"sent no heartbeat for {silent:.1f} s and did not answer a probe",
                node_lost=True,
            )
