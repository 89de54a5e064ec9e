"""Membership, planning, loading and re-forming: the coordinator's view of the cluster.

Workers found by Bonjour or given as seeds are described and kept by node
id (a worker that comes back at a new address keeps its id). Once enough are
known and membership has been quiet for a moment, the planner places the
model's layers, every worker loads its range, and the head runner's address
becomes the entry point for requests. When a node or a runner of the
pipeline fails, the group is torn down and the model placed again on the
nodes that remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from pomona import rpc
from pomona.config import CoordinatorConfig
from pomona.coordinator import events as ev
from pomona.coordinator.distribution import (
    Distributor,
    TransferFailed,
    check_disk,
    prefer_holders,
    relabel,
)
from pomona.coordinator.monitor import Monitor
from pomona.coordinator.placement import Assignment, PlacementError, place
from pomona.coordinator.planner import Plan
from pomona.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

RETRY_PLAN_S = 2.0
RETRY_TRANSFER_S = 10.0


@dataclass
class Member:
    node_id: str
    name: str
    address: str
    describe: worker_pb2.DescribeReply
    stub: worker_pb2_grpc.WorkerStub
    state: str = "discovered"  # discovered, loading, serving, idle, lost

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass(frozen=True)
class Serving:
    load_id: str
    head_address: str
    assignments: tuple[Assignment, ...]
    max_context: int
    # What each runner reported once ready, by node id.
    shards: dict[str, worker_pb2.ShardStatus] = field(default_factory=dict)

    def holds(self, node_id: str) -> bool:
        return any(a.node_id == node_id for a in self.assignments)


class Cluster:
    def __init__(self, config: CoordinatorConfig, monitor: Monitor | None = None):
        self.config = config
        self.monitor = monitor or Monitor()
        self.members: dict[str, Member] = {}
        self.serving: Serving | None = None
        self.problem = "waiting for workers"
        self.plan: Plan | None = None
        self.loading = False
        # Why the pipeline last broke, for the requests it cut off; while it
        # re-forms, new requests wait for it instead of failing.
        self.failure = ""
        self.reforming = False
        self.ever_served = False
        self._changed = asyncio.Event()
        self._last_change = time.monotonic()
        self._serving_changed = asyncio.Condition()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.distribution = Distributor(self.monitor, self.channel)

    # -- membership -------------------------------------------------------------

    async def add_address(self, address: str, props: dict[str, str] | None = None) -> Member | None:
        """Describe the worker at ``address`` and keep it if it belongs here."""
        stub = worker_pb2_grpc.WorkerStub(self.channel(address))
        try:
            reply = await stub.Describe(worker_pb2.DescribeRequest(), timeout=rpc.DESCRIBE_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            log.warning("cannot describe worker at %s: %s", address, rpc.describe_error(e, address))
            return None
        if reply.cluster != self.config.cluster:
            log.info("ignoring %s at %s: cluster %r", reply.name, address, reply.cluster)
            return None
        known = self.members.get(reply.node_id)
        if known is not None and known.address == address:
            known.describe = reply
            return known
        member = Member(reply.node_id, reply.name, address, reply, stub)
        if known is not None:
            log.info("worker %s (%s) is now at %s", reply.name, reply.node_id, address)
            member.state = known.state
        else:
            log.info("worker %s (node %s) joined at %s", reply.name, reply.node_id, address)
        self.members[reply.node_id] = member
        self.monitor.add_node(reply.node_id, reply.name, address)
        self.note_change()
        return member

    def usable(self) -> list[Member]:
        return sorted(
            (m for m in self.members.values() if m.state != "lost"), key=lambda m: m.node_id
        )

    def returned(self, member: Member) -> None:
        """A lost member answers again: it is taken back in at the next plan."""
        if member.state == "lost":
            log.info("worker %s (%s) is back", member.name, member.node_id)
            member.state = "idle"
            self.note_change()

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = rpc.aio_channel(address, self.config.auth)
        return self._channels[address]

    def note_change(self) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    # -- planning and loading -------------------------------------------------------

    async def run(self) -> None:
        """Plan and load whenever the cluster is not serving and membership allows."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self.serving is not None:
                for m in self.members.values():
                    if m.state == "discovered":
                        m.state = "idle"
                continue
            usable = self.usable()
            # min_workers holds back the first plan only: after a failure the
            # model is placed on whatever remains, if it fits.
            needed = 1 if self.ever_served else self.config.min_workers
            if len(usable) < needed:
                self.reforming = False
                self.problem = f"waiting for workers: {len(usable)} of {needed} available" + (
                    f" ({self.failure})" if self.failure else ""
                )
                continue
            quiet = self.config.settle_seconds - (time.monotonic() - self._last_change)
            if quiet > 0:
                await asyncio.sleep(quiet)
                if self._changed.is_set():
                    continue
            await self.plan_and_load()

    async def plan_and_load(self) -> None:
        members = self.usable()
        if await self._adopt(members):
            return
        self.loading = True
        try:
            survey = await self.distribution.take_survey(members, self.config.model)
            info = await self._inspect(
                self.distribution.inspector(members, self.config.model, survey)
            )
            if info is None:
                return
            assignments, self.plan = place(
                info,
                [m.describe for m in members],
                layers=self.config.layers,
                context=self.config.context,
                concurrency=self.config.concurrency,
                objective=self.config.objective,
            )
            assignments = prefer_holders(
                assignments, [m.describe for m in members], survey, self.config.model
            )
            self.plan = relabel(self.plan, assignments)
            check_disk(assignments, survey, self.config.model)
            self.problem = f"fetching the stages of {self.config.model} that workers lack"
            await self.distribution.stage_all(
                self.config.model,
                members,
                assignments,
                survey,
                self.config.load_timeout,
                lambda line: setattr(self, "problem", line),
            )
            await self._load(info, members, assignments)
        except PlacementError as e:
            self.reforming = False
            self.problem = str(e)
            self.monitor.events.record(ev.LOAD_FAILED, message=str(e))
            log.error("cannot place %s: %s", self.config.model, e)
            if isinstance(e, TransferFailed):
                # A cut transfer resumes where it stopped: try again shortly.
                asyncio.get_running_loop().call_later(RETRY_TRANSFER_S, self.note_change)
        finally:
            self.loading = False

    async def _adopt(self, members: list[Member]) -> bool:
        """Serve a pipeline that is already loaded (a restarted coordinator).

        Adopts it when the workers' shards are all ready, of one load of this
        model, and cover every layer in rank order from a head that answers.
        """
        shards = [(m, m.describe.shard) for m in members]
        ready = [
            (m, s)
            for m, s in shards
            if s.state == worker_pb2.SHARD_STATE_READY and s.model == self.config.model
        ]
        if not ready or len({s.load_id for _, s in ready}) != 1:
            return False
        ready.sort(key=lambda ms: ms[1].rank)
        ends = [0] + [s.end_layer for _, s in ready]
        if [s.rank for _, s in ready] != list(range(len(ready))) or any(
            s.start_layer != ends[i] for i, (_, s) in enumerate(ready)
        ):
            return False
        head = ready[0][1]
        if not head.runner_address:
            return False
        assignments = tuple(
            Assignment(m.node_id, m.name, s.start_layer, s.end_layer, s.weights_bytes)
            for m, s in ready
        )
        shards_by_node = {m.node_id: s for m, s in ready}
        for m in self.members.values():
            if m.state != "lost":
                m.state = "serving" if m.node_id in shards_by_node else "idle"
        self.problem = ""
        await self._set_serving(
            Serving(
                head.load_id, head.runner_address, assignments, self.config.context, shards_by_node
            )
        )
        self.monitor.events.record(
            ev.PLAN_CHANGED,
            message=f"adopted the running load {head.load_id} of {self.config.model}",
        )
        log.info(
            "adopted the running pipeline %s; requests enter at %s",
            head.load_id,
            head.runner_address,
        )
        return True

    async def _inspect(self, member: Member) -> worker_pb2.ModelInfo | None:
        try:
            return await member.stub.InspectModel(
                worker_pb2.InspectModelRequest(model=self.config.model), timeout=rpc.INSPECT_TIMEOUT
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                # A busy or restarting worker: try again shortly.
                asyncio.get_running_loop().call_later(RETRY_PLAN_S, self.note_change)
            self.reforming = False
            self.problem = e.details() or str(e.code())
            self.monitor.events.record(ev.LOAD_FAILED, member.node_id, member.name, self.problem)
            log.error("%s", self.problem)
            return None

    async def _load(
        self, info: worker_pb2.ModelInfo, members: list[Member], assignments: list[Assignment]
    ) -> None:
        by_id = {m.node_id: m for m in members}
        ordered = [by_id[a.node_id] for a in assignments]
        load_id = uuid.uuid4().hex[:12]
        ring_hosts = [f"{m.host}:{m.describe.ring_port}" for m in ordered]
        workers = [m.address for m in ordered]
        max_context = min(self.config.context, info.max_context or self.config.context)
        layout = ", ".join(
            f"{m.name} [{a.start}, {a.end})" for m, a in zip(ordered, assignments, strict=True)
        )
        self.problem = f"loading {self.config.model} on {len(ordered)} workers"
        self.monitor.events.record(ev.PLAN_CHANGED, message=f"{self.config.model}: {layout}")
        self.monitor.events.record(ev.LOAD_STARTED, message=f"load {load_id}")
        log.info("loading %s (%d layers): %s", self.config.model, info.num_layers, layout)
        for m in ordered:
            m.state = "loading"
        requests = [
            worker_pb2.LoadRequest(
                load_id=load_id,
                model=self.config.model,
                start_layer=a.start,
                end_layer=a.end,
                rank=rank,
                world_size=len(ordered),
                ring_hosts=ring_hosts,
                workers=workers,
                backend="ring",
                max_context=max_context,
                max_batch=self.config.max_batch,
                max_queue=self.config.max_queue,
                prefill_step=self.config.prefill_step,
            )
            for rank, a in enumerate(assignments)
        ]
        started = time.monotonic()
        results = await asyncio.gather(
            *(self._load_one(m, r) for m, r in zip(ordered, requests, strict=True)),
            return_exceptions=True,
        )
        errors = [
            f"{m.name}: {r}"
            for m, r in zip(ordered, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if errors or any(m.state == "lost" for m in ordered):
            self.reforming = False
            self.problem = "loading failed on " + ("; ".join(errors) or "a lost worker")
            self.monitor.events.record(ev.LOAD_FAILED, message=self.problem)
            log.error("%s", self.problem)
            await self._unload(ordered, load_id)
            for m in ordered:
                if m.state != "lost":
                    m.state = "idle"
            return
        shards = {
            m.node_id: r
            for m, r in zip(ordered, results, strict=True)
            if isinstance(r, worker_pb2.ShardStatus)
        }
        head = shards[ordered[0].node_id]
        for m in self.members.values():
            if m.state != "lost":
                m.state = "serving" if m in ordered else "idle"
        self.problem = ""
        await self._set_serving(
            Serving(load_id, head.runner_address, tuple(assignments), max_context, shards)
        )
        self.monitor.events.record(
            ev.LOAD_FINISHED, message=f"load {load_id} in {time.monotonic() - started:.1f} s"
        )
        log.info("serving %s; requests enter at %s", self.config.model, head.runner_address)

    async def _load_one(
        self, member: Member, request: worker_pb2.LoadRequest
    ) -> worker_pb2.ShardStatus:
        try:
            await member.stub.Load(request, timeout=rpc.CONTROL_TIMEOUT)
            last = None
            async for status in member.stub.WatchShard(
                worker_pb2.WatchShardRequest(load_id=request.load_id),
                timeout=self.config.load_timeout,
            ):
                last = status
                if status.state == worker_pb2.SHARD_STATE_FAILED:
                    raise RuntimeError(status.error or "the runner failed")
            if last is None or last.state != worker_pb2.SHARD_STATE_READY:
                raise RuntimeError("the runner stopped before it was ready")
            return last
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(rpc.describe_error(e, member.address)) from e

    async def _unload(self, members: list[Member], load_id: str) -> None:
        async def one(m: Member) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await m.stub.Unload(
                    worker_pb2.UnloadRequest(load_id=load_id), timeout=rpc.CONTROL_TIMEOUT
                )

        await asyncio.gather(*(one(m) for m in members if m.state != "lost"))

    # -- failure ----------------------------------------------------------------------

    async def lose(self, member: Member, reason: str, *, node_lost: bool) -> None:
        """A member's node (``node_lost``) or its runner failed: re-form without it."""
        if node_lost and member.state != "lost":
            member.state = "lost"
            self.monitor.mark_lost(member.node_id, reason)
            log.error("worker %s (%s) lost: %s", member.name, member.node_id, reason)
        serving = self.serving
        if serving is None or not serving.holds(member.node_id):
            self.note_change()
            return
        self.failure = f"{member.name} ({member.node_id}) {reason}"
        self.problem = f"re-forming the pipeline: {self.failure}"
        self.reforming = True
        self.monitor.events.record(ev.PIPELINE_FAILED, member.node_id, member.name, reason)
        await self._set_serving(None)
        plan_members = [self.members[a.node_id] for a in serving.assignments]
        # Unloading kills every runner of the group, also those blocked in a
        # collective on the lost peer.
        await self._unload(plan_members, serving.load_id)
        for m in plan_members:
            if m.state != "lost":
                m.state = "idle"
        self.note_change()

    async def _set_serving(self, serving: Serving | None) -> None:
        async with self._serving_changed:
            self.serving = serving
            if serving is not None:
                self.reforming = False
                self.ever_served = True
            self._serving_changed.notify_all()

    async def wait_serving(self, not_load_id: str, timeout: float) -> Serving | None:
        """The pipeline once it serves with a load other than ``not_load_id``."""

        def ready() -> bool:
            return self.serving is not None and self.serving.load_id != not_load_id

        async with self._serving_changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._serving_changed.wait_for(ready), timeout)
            return self.serving if ready() else None

    async def shutdown(self) -> None:
        if self.serving is not None:
            members = [self.members[a.node_id] for a in self.serving.assignments]
            await self._unload(members, self.serving.load_id)
            self.serving = None
        for ch in self._channels.values():
            await ch.close()
