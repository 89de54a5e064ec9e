"""The coordinator's view of cluster health: latest samples, node states, figures, events.

Pure state with no I/O but the event log's file: the coordinator feeds it what arrives
(`add_node`, `observe_sample`, `observe_rtt`, `mark_lost`), calls `refresh` about once
a second so that state changes become events, and builds `StatusReply`s from it with
`to_status_reply`. Times are `time.monotonic()` seconds unless a name says otherwise;
every method takes `now` so that tests need no clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from pomona.coordinator.events import (
    DRAFT_FAILED,
    EVENT_KINDS,
    NODE_DEGRADED,
    NODE_JOINED,
    NODE_LOST,
    NODE_RECOVERED,
    NODE_RETURNED,
    REQUEST_FAILED,
    Event,
    EventLog,
)
from pomona.units import format_bytes
from pomona.v1 import coordinator_pb2, worker_pb2

__all__ = [
    "DEFAULT_THRESHOLDS",
    "EVENT_KINDS",
    "ClusterFigures",
    "Event",
    "EventLog",
    "Health",
    "Monitor",
    "NodeInfo",
    "NodeState",
    "Stage",
    "Thresholds",
    "derive_state",
    "to_status_reply",
]

_LOADING_SHARD = {
    worker_pb2.SHARD_STATE_STARTING,
    worker_pb2.SHARD_STATE_LOADING,
    worker_pb2.SHARD_STATE_CONNECTING,
}


class NodeState(str, Enum):
    DISCOVERED = "discovered"
    LOADING = "loading"
    SERVING = "serving"
    IDLE = "idle"
    DEGRADED = "degraded"
    LOST = "lost"

    def to_proto(self) -> coordinator_pb2.NodeState.ValueType:
        return coordinator_pb2.NodeState.Value(f"NODE_STATE_{self.name}")


@dataclass(frozen=True)
class Thresholds:
    """When a node counts as degraded or lost."""

    late_after_s: float = 2.5  # no sample for this long: degraded
    lost_after_s: float = 5.0  # no sample for this long: lost
    rtt_degraded_s: float = 0.5  # a lab LAN answers in milliseconds
    swap_growth_bytes_per_s: float = 16e6  # swap growing this fast: swapping heavily
    swap_window_s: float = 10.0  # ... measured over this window


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Health:
    state: NodeState
    reasons: tuple[str, ...] = ()
    loading_percent: float | None = None


def derive_state(
    *,
    membership: str,
    sample: worker_pb2.NodeSample | None,
    seen_ago_s: float | None,
    heartbeat_rtt_s: float | None = None,
    swap_growth_bytes_per_s: float | None = None,
    lost_reason: str | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> Health:
    """A node's state from the cluster's membership view and its latest telemetry.

    `membership` is the cluster's own word for the node ("discovered", "loading",
    "serving", "idle" or "lost"). Lost beats degraded, which beats the rest.
    """
    if lost_reason is not None:
        return Health(NodeState.LOST, (lost_reason,))
    if membership == "lost":
        return Health(NodeState.LOST, ("the coordinator lost this worker",))
    if seen_ago_s is not None and seen_ago_s >= thresholds.lost_after_s:
        return Health(NodeState.LOST, (f"no telemetry for {seen_ago_s:.0f} s",))
    shard = sample.shard if sample is not None and sample.HasField("shard") else None
    percent = None
    if shard is not None and (shard.state in _LOADING_SHARD or membership == "loading"):
        base = NodeState.LOADING
        percent = max(0.0, min(100.0, shard.progress * 100.0))
    elif membership in ("discovered", "loading", "serving", "idle"):
        base = NodeState(membership)
    else:
        raise ValueError(f"unknown membership state {membership!r}")
    reasons = []
    if sample is not None:
        if sample.memory_pressure == "critical":
            reasons.append("memory pressure critical")
        if sample.thermal_state in ("serious", "critical"):
            reasons.append(f"thermal state {sample.thermal_state}")
    if swap_growth_bytes_per_s is not None and (
        swap_growth_bytes_per_s >= thresholds.swap_growth_bytes_per_s
    ):
        reasons.append(f"swapping {format_bytes(swap_growth_bytes_per_s)}/s")
    if heartbeat_rtt_s is not None and heartbeat_rtt_s >= thresholds.rtt_degraded_s:
        reasons.append(f"heartbeat RTT {heartbeat_rtt_s * 1000:.0f} ms")
    if seen_ago_s is not None and seen_ago_s >= thresholds.late_after_s:
        reasons.append(f"no telemetry for {seen_ago_s:.1f} s")
    if (
        shard is not None
        and shard.state == worker_pb2.SHARD_STATE_FAILED
        and base in (NodeState.LOADING, NodeState.SERVING)
    ):
        reasons.append(f"runner failed: {shard.error or 'no reason given'}")
    if reasons:
        return Health(NodeState.DEGRADED, tuple(reasons), percent)
    return Health(base, (), percent)


# ---- the monitor -------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterFigures:
    tokens_per_s: float
    ttft_s: float | None
    requests_in_flight: int
    requests_total: int
    requests_failed: int
    prompt_cache_bytes: int = 0
    prompt_cache_budget_bytes: int = 0
    prompt_cache_hit_rate: float | None = None
    draft_acceptance_rate: float | None = None
    tokens_per_verify_step: float | None = None


@dataclass
class _Node:
    node_id: str
    name: str
    known_since: float
    sample: worker_pb2.NodeSample | None = None
    sample_at: float | None = None
    rtt_s: float | None = None
    lost_reason: str | None = None
    swap: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    reported: Health | None = None
    runner_key: tuple[str, int] | None = None  # (load_id, pid) of the head runner counted
    runner_requests: int = 0
    draft_failed: tuple[str, int] | None = None  # the head runner whose draft failure is recorded


class Monitor:
    def __init__(
        self,
        events: EventLog | None = None,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events if events is not None else EventLog()
        self.thresholds = thresholds
        self._clock = clock
        self._nodes: dict[str, _Node] = {}
        self._requests_done = 0  # requests of head runners that have since gone

    def now(self) -> float:
        return self._clock()

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def knows(self, node_id: str) -> bool:
        return node_id in self._nodes

    def add_node(
        self, node_id: str, name: str, address: str = "", now: float | None = None
    ) -> None:
        """A worker the cluster has described; records `node_joined` the first time."""
        now = self._now(now)
        node = self._nodes.get(node_id)
        if node is None:
            self._nodes[node_id] = _Node(node_id, name, now)
            self.events.record(NODE_JOINED, node_id, name, f"at {address}" if address else "")
            return
        node.name = name
        if node.lost_reason is not None or (
            node.reported and node.reported.state is NodeState.LOST
        ):
            node.lost_reason, node.known_since = None, now  # `refresh` records the return

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def observe_sample(
        self, node_id: str, sample: worker_pb2.NodeSample, now: float | None = None
    ) -> None:
        now = self._now(now)
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(node_id, node_id, now)
        node.sample, node.sample_at, node.lost_reason = sample, now, None
        node.swap.append((now, sample.swap_used_bytes))
        while node.swap and now - node.swap[0][0] > self.thresholds.swap_window_s:
            node.swap.popleft()
        if sample.HasField("runner") and sample.shard.rank == 0 and sample.shard.load_id:
            key = (sample.shard.load_id, sample.shard.runner_pid)
            total = sample.runner.requests_total
            if key != node.runner_key or total < node.runner_requests:
                self._requests_done += node.runner_requests
                node.runner_key = key
            node.runner_requests = total
            if sample.runner.draft_failed and node.draft_failed != key:
                node.draft_failed = key
                self.events.record(
                    DRAFT_FAILED,
                    node_id,
                    node.name,
                    "the draft model failed (see the runner's log): decoding goes on without it",
                )

    def observe_rtt(self, node_id: str, rtt_s: float) -> None:
        if node_id in self._nodes:
            self._nodes[node_id].rtt_s = rtt_s

    def mark_lost(self, node_id: str, reason: str) -> None:
        """Lost now (its stream broke, its runner died), until its next sample."""
        if node_id in self._nodes:
            self._nodes[node_id].lost_reason = reason

    def swap_growth(self, node_id: str) -> float | None:
        """Bytes per second swap grew over the window; None with too short a history."""
        swap = self._nodes[node_id].swap
        if len(swap) < 2 or swap[-1][0] - swap[0][0] < self.thresholds.swap_window_s / 2:
            return None
        return (swap[-1][1] - swap[0][1]) / (swap[-1][0] - swap[0][0])

    def seen_ago(self, node_id: str, now: float | None = None) -> float:
        node = self._nodes[node_id]
        last = node.known_since if node.sample_at is None else max(node.sample_at, node.known_since)
        return max(0.0, self._now(now) - last)

    def sample(self, node_id: str) -> worker_pb2.NodeSample | None:
        node = self._nodes.get(node_id)
        return node.sample if node is not None else None

    def rtt(self, node_id: str) -> float | None:
        node = self._nodes.get(node_id)
        return node.rtt_s if node is not None else None

    def health(self, node_id: str, membership: str, now: float | None = None) -> Health:
        node = self._nodes.get(node_id)
        if node is None:
            return derive_state(
                membership=membership, sample=None, seen_ago_s=None, thresholds=self.thresholds
            )
        return derive_state(
            membership=membership,
            sample=node.sample,
            seen_ago_s=self.seen_ago(node_id, now),
            heartbeat_rtt_s=node.rtt_s,
            swap_growth_bytes_per_s=self.swap_growth(node_id),
            lost_reason=node.lost_reason,
            thresholds=self.thresholds,
        )

    def refresh(
        self, memberships: Mapping[str, str], now: float | None = None
    ) -> dict[str, Health]:
        """Every given node's health (node id -> cluster membership state); records the
        changes worth an event: lost, returned, degraded, recovered."""
        now = self._now(now)
        result = {}
        for node_id, membership in memberships.items():
            if node_id not in self._nodes:
                continue
            node = self._nodes[node_id]
            health = result[node_id] = self.health(node_id, membership, now)
            before = node.reported.state if node.reported is not None else None
            node.reported = health
            why = "; ".join(health.reasons)
            if health.state is NodeState.LOST and before is not NodeState.LOST:
                self.events.record(NODE_LOST, node_id, node.name, why)
            elif before is NodeState.LOST and health.state is not NodeState.LOST:
                self.events.record(NODE_RETURNED, node_id, node.name, f"now {health.state.value}")
            elif health.state is NodeState.DEGRADED and before is not NodeState.DEGRADED:
                self.events.record(NODE_DEGRADED, node_id, node.name, why)
            elif before is NodeState.DEGRADED and health.state is not NodeState.DEGRADED:
                self.events.record(NODE_RECOVERED, node_id, node.name, f"now {health.state.value}")
        return result

    def cluster_figures(self, load_id: str = "", now: float | None = None) -> ClusterFigures:
        """Summed over the head runners (rank 0, ready, of `load_id` when given) that are
        not lost; totals keep counting across runner restarts."""
        tokens, in_flight, ttfts = 0.0, 0, []
        cached, budget, lookups, hits = 0, 0, 0, 0
        drafted, accepted, verifies, verified = 0, 0, 0, 0
        for node_id, node in self._nodes.items():
            s = node.sample
            if s is None or not s.HasField("runner") or s.shard.rank != 0:
                continue
            if s.shard.state != worker_pb2.SHARD_STATE_READY or (
                load_id and s.shard.load_id != load_id
            ):
                continue
            if self.health(node_id, "idle", now).state is NodeState.LOST:
                continue
            tokens += s.runner.tokens_per_s
            in_flight += s.runner.requests_in_flight
            if s.runner.HasField("ttft_s"):
                ttfts.append(s.runner.ttft_s)
            cached += s.runner.prompt_cache_bytes
            budget += s.runner.prompt_cache_budget_bytes
            lookups += s.runner.prompt_cache_lookups
            hits += s.runner.prompt_cache_hits
            drafted += s.runner.draft_tokens
            accepted += s.runner.draft_accepted_tokens
            verifies += s.runner.verify_steps
            verified += s.runner.verify_tokens
        total = self._requests_done + sum(n.runner_requests for n in self._nodes.values())
        return ClusterFigures(
            tokens_per_s=tokens,
            ttft_s=sum(ttfts) / len(ttfts) if ttfts else None,
            requests_in_flight=in_flight,
            requests_total=total,
            requests_failed=self.events.count(REQUEST_FAILED),
            prompt_cache_bytes=cached,
            prompt_cache_budget_bytes=budget,
            prompt_cache_hit_rate=hits / lookups if lookups else None,
            draft_acceptance_rate=accepted / drafted if drafted else None,
            tokens_per_verify_step=verified / verifies if verifies else None,
        )


# ---- the Status reply --------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """What the cluster knows of a member, as plain values."""

    node_id: str
    name: str
    address: str
    membership: str  # "discovered", "loading", "serving", "idle", "lost"
    hardware: worker_pb2.Hardware | None = None
    mlx_version: str = ""


class Stage(Protocol):
    """One stage of the plan; `placement.Assignment` is one."""

    @property
    def node_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def weights_bytes(self) -> int: ...


def to_status_reply(
    monitor: Monitor,
    *,
    cluster: str,
    model: str,
    serving: bool,
    problem: str,
    nodes: Sequence[NodeInfo],
    plan: Sequence[Stage] = (),
    load_id: str = "",
    model_info: worker_pb2.ModelInfo | None = None,
    max_context: int = 0,
    now: float | None = None,
    wall_now: float | None = None,
) -> coordinator_pb2.StatusReply:
    """The `Coordinator.Status` reply: nodes in plan order, then the others by name.

    A lost node has no sample and no shard: its last figures are stale. Every stage of
    the plan that serves (ready, not lost) shows the pipeline's tokens/s, which only
    the head runner counts.
    """
    now = monitor.now() if now is None else now
    rank = {stage.node_id: i for i, stage in enumerate(plan)}
    ordered = sorted(nodes, key=lambda n: (rank.get(n.node_id, len(rank)), n.name, n.node_id))
    figures = monitor.cluster_figures(load_id, now)
    reply = coordinator_pb2.StatusReply(
        cluster=cluster,
        model=model,
        serving=serving,
        problem=problem,
        load_id=load_id,
        tokens_per_s=figures.tokens_per_s,
        requests_in_flight=figures.requests_in_flight,
        requests_total=figures.requests_total,
        requests_failed=figures.requests_failed,
        timestamp=time.time() if wall_now is None else wall_now,
        max_context=max_context,
    )
    if model_info is not None:
        reply.vocab_size = model_info.vocab_size
        reply.model_profile_json = model_info.profile_json
    if figures.ttft_s is not None:
        reply.ttft_s = figures.ttft_s
    reply.prompt_cache_bytes = figures.prompt_cache_bytes
    reply.prompt_cache_budget_bytes = figures.prompt_cache_budget_bytes
    if figures.prompt_cache_hit_rate is not None:
        reply.prompt_cache_hit_rate = figures.prompt_cache_hit_rate
    if figures.draft_acceptance_rate is not None:
        reply.draft_acceptance_rate = figures.draft_acceptance_rate
    if figures.tokens_per_verify_step is not None:
        reply.tokens_per_verify_step = figures.tokens_per_verify_step
    for stage in plan:
        reply.plan.add(
            node_id=stage.node_id,
            name=stage.name,
            start_layer=stage.start,
            end_layer=stage.end,
            weights_bytes=stage.weights_bytes,
        )
    for info in ordered:
        health = monitor.health(info.node_id, info.membership, now)
        sample = monitor.sample(info.node_id)
        status = reply.nodes.add()
        node = status.node
        node.node_id, node.name, node.address = info.node_id, info.name, info.address
        node.state, node.mlx_version = health.state.to_proto(), info.mlx_version
        if info.hardware is not None:
            node.hardware.CopyFrom(info.hardware)
        if sample is not None and health.state is not NodeState.LOST:
            status.sample.CopyFrom(sample)
            if sample.HasField("shard"):
                node.shard.CopyFrom(sample.shard)
            if info.node_id in rank and _serves(sample.shard, load_id):
                status.pipeline_tokens_per_s = figures.tokens_per_s
        if monitor.knows(info.node_id):
            status.last_seen_s = monitor.seen_ago(info.node_id, now)
        rtt = monitor.rtt(info.node_id)
        if rtt is not None and health.state is not NodeState.LOST:
            status.heartbeat_rtt_s = rtt
    return reply


def _serves(shard: worker_pb2.ShardStatus, load_id: str) -> bool:
    return shard.state == worker_pb2.SHARD_STATE_READY and (not load_id or shard.load_id == load_id)
