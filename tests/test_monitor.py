"""The coordinator's health view: node states, cluster figures, the event log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from pomona.coordinator.events import LOAD_STARTED, REQUEST_FAILED
from pomona.coordinator.monitor import (
    Event,
    EventLog,
    Health,
    Monitor,
    NodeInfo,
    NodeState,
    Thresholds,
    derive_state,
    to_status_reply,
)
from pomona.coordinator.placement import Assignment
from pomona.units import format_bytes
from pomona.v1 import coordinator_pb2, worker_pb2

GB = 10**9
READY = worker_pb2.SHARD_STATE_READY


def sample(
    *,
    pressure: str = "normal",
    thermal: str = "",
    swap: int = 0,
    shard: worker_pb2.ShardStatus | None = None,
    runner: worker_pb2.RunnerStats | None = None,
) -> worker_pb2.NodeSample:
    s = worker_pb2.NodeSample(
        timestamp=1.0,
        cpu_percent=12.5,
        memory_total_bytes=64 * GB,
        memory_used_bytes=20 * GB,
        memory_available_bytes=44 * GB,
        memory_pressure=pressure,
        swap_used_bytes=swap,
        thermal_state=thermal,
    )
    if shard is not None:
        s.shard.CopyFrom(shard)
    if runner is not None:
        s.runner.CopyFrom(runner)
    return s


def shard(
    state: int = READY, rank: int = 0, progress: float = 1.0, **kw: object
) -> worker_pb2.ShardStatus:
    return worker_pb2.ShardStatus(
        load_id=str(kw.get("load_id", "L1")),
        state=state,
        rank=rank,
        progress=progress,
        start_layer=0,
        end_layer=8,
        runner_pid=int(kw.get("pid", 100)),  # type: ignore[call-overload]
        error=str(kw.get("error", "")),
    )


# ---- derive_state --------------------------------------------------------------------

LOADING = worker_pb2.SHARD_STATE_LOADING
FAILED = worker_pb2.SHARD_STATE_FAILED
T = Thresholds()


SERVING, IDLE, DEGRADED, LOST = (
    NodeState.SERVING,
    NodeState.IDLE,
    NodeState.DEGRADED,
    NodeState.LOST,
)


# (membership, sample, seconds since the last sample, other inputs) -> state, a reason
@pytest.mark.parametrize(
    ("membership", "s", "seen", "extra", "state", "reason"),
    [
        ("discovered", None, 0.1, {}, NodeState.DISCOVERED, None),
        ("idle", sample(), 1.0, {}, IDLE, None),
        ("serving", sample(shard=shard()), 1.0, {}, SERVING, None),
        ("loading", None, 1.0, {}, NodeState.LOADING, None),
        ("idle", sample(shard=shard(LOADING, progress=0.4)), 1.0, {}, NodeState.LOADING, None),
        ("serving", sample(pressure="critical"), 1.0, {}, DEGRADED, "memory pressure critical"),
        ("serving", sample(pressure="warn"), 1.0, {}, SERVING, None),
        ("serving", sample(thermal="serious"), 1.0, {}, DEGRADED, "thermal state serious"),
        ("idle", sample(thermal="critical"), 1.0, {}, DEGRADED, "thermal state critical"),
        ("idle", sample(thermal="fair"), 1.0, {}, IDLE, None),
        ("serving", sample(), 1.0, {"heartbeat_rtt_s": 0.8}, DEGRADED, "heartbeat RTT 800 ms"),
        ("serving", sample(), 1.0, {"heartbeat_rtt_s": 0.002}, SERVING, None),
        (
            "serving",
            sample(),
            1.0,
            {"swap_growth_bytes_per_s": 50e6},
            DEGRADED,
            f"swapping {format_bytes(50e6)}/s",
        ),
        ("serving", sample(swap=30 * GB), 1.0, {"swap_growth_bytes_per_s": 0.0}, SERVING, None),
        ("serving", sample(), 3.0, {}, DEGRADED, "no telemetry for 3.0 s"),
        ("serving", sample(), 5.0, {}, LOST, "no telemetry for 5 s"),
        ("serving", sample(pressure="critical"), 9.0, {}, LOST, "no telemetry for 9 s"),
        ("serving", sample(), 0.5, {"lost_reason": "stream closed"}, LOST, "stream closed"),
        ("lost", sample(), 0.5, {}, LOST, "the coordinator lost this worker"),
        (
            "serving",
            sample(shard=shard(FAILED, error="oom")),
            1.0,
            {},
            DEGRADED,
            "runner failed: oom",
        ),
        ("idle", sample(shard=shard(FAILED, error="oom")), 1.0, {}, IDLE, None),
    ],
)
def test_derive_state_table(
    membership: str,
    s: worker_pb2.NodeSample | None,
    seen: float,
    extra: dict[str, Any],
    state: NodeState,
    reason: str | None,
) -> None:
    health = derive_state(membership=membership, sample=s, seen_ago_s=seen, thresholds=T, **extra)
    assert health.state is state
    assert health.reasons == (() if reason is None else (reason,))


def test_loading_carries_its_percent() -> None:
    health = derive_state(
        membership="loading", sample=sample(shard=shard(LOADING, progress=0.42)), seen_ago_s=0.5
    )
    assert health == Health(NodeState.LOADING, (), pytest.approx(42.0))


def test_unknown_membership_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown membership"):
        derive_state(membership="sleeping", sample=None, seen_ago_s=None)


def test_node_states_map_onto_the_proto_enum() -> None:
    for state in NodeState:
        assert coordinator_pb2.NodeState.Name(state.to_proto()) == f"NODE_STATE_{state.name}"


# ---- the monitor ---------------------------------------------------------------------


def test_a_node_that_stops_sending_is_lost_then_returns_under_its_id(tmp_path: Path) -> None:
    monitor = Monitor(EventLog(tmp_path / "events.jsonl"))
    monitor.add_node("n1", "mini-1", "10.0.0.1:50151", now=0.0)
    monitor.observe_sample("n1", sample(), now=1.0)
    assert monitor.refresh({"n1": "idle"}, now=1.5)["n1"].state is NodeState.IDLE
    assert monitor.refresh({"n1": "idle"}, now=4.0)["n1"].state is NodeState.DEGRADED
    assert monitor.refresh({"n1": "idle"}, now=6.0)["n1"].state is NodeState.LOST
    assert monitor.refresh({"n1": "idle"}, now=7.0)["n1"].state is NodeState.LOST
    monitor.observe_sample("n1", sample(), now=8.0)
    assert monitor.refresh({"n1": "idle"}, now=8.1)["n1"].state is NodeState.IDLE
    kinds = [(e.kind, e.node_id) for e in monitor.events.since(0)]
    assert kinds == [
        ("node_joined", "n1"),
        ("node_degraded", "n1"),
        ("node_lost", "n1"),
        ("node_returned", "n1"),
    ]
    assert "no telemetry" in monitor.events.since(2)[0].message


def test_marked_lost_at_once_and_back_when_described_again() -> None:
    monitor = Monitor()
    monitor.add_node("n1", "mini-1", now=0.0)
    monitor.observe_sample("n1", sample(), now=0.5)
    monitor.mark_lost("n1", "telemetry stream closed: connection reset")
    assert monitor.refresh({"n1": "serving"}, now=0.6)["n1"].reasons == (
        "telemetry stream closed: connection reset",
    )
    monitor.add_node("n1", "mini-1", now=30.0)
    assert monitor.refresh({"n1": "idle"}, now=30.5)["n1"].state is NodeState.IDLE
    assert [e.kind for e in monitor.events.since(0)][-2:] == ["node_lost", "node_returned"]


def test_swap_growing_fast_degrades_and_recovers() -> None:
    monitor = Monitor()
    monitor.add_node("n1", "mini-1", now=0.0)
    for t in range(0, 11):
        monitor.observe_sample("n1", sample(swap=t * 100_000_000), now=float(t))
    health = monitor.refresh({"n1": "serving"}, now=10.1)["n1"]
    assert health.state is NodeState.DEGRADED
    assert health.reasons == (f"swapping {format_bytes(100e6)}/s",)
    for t in range(11, 23):
        monitor.observe_sample("n1", sample(swap=10 * 100_000_000), now=float(t))
    assert monitor.refresh({"n1": "serving"}, now=22.1)["n1"].state is NodeState.SERVING
    assert [e.kind for e in monitor.events.since(0)] == [
        "node_joined",
        "node_degraded",
        "node_recovered",
    ]


def head_runner(
    tokens_per_s: float, total: int, in_flight: int = 1, ttft: float | None = None
) -> worker_pb2.RunnerStats:
    stats = worker_pb2.RunnerStats(
        tokens_per_s=tokens_per_s,
        requests_total=total,
        requests_in_flight=in_flight,
        mlx_active_bytes=3 * GB,
    )
    if ttft is not None:
        stats.ttft_s = ttft
    return stats


def test_cluster_figures_come_from_head_runners_and_totals_survive_restarts() -> None:
    monitor = Monitor()
    for node_id in ("a", "b"):
        monitor.add_node(node_id, node_id, now=0.0)
    monitor.observe_sample(
        "a", sample(shard=shard(rank=0), runner=head_runner(42.0, 10, 2, 0.25)), now=1.0
    )
    monitor.observe_sample(
        "b", sample(shard=shard(rank=1), runner=head_runner(41.0, 10, 2)), now=1.0
    )
    figures = monitor.cluster_figures("L1", now=1.5)
    assert (figures.tokens_per_s, figures.requests_in_flight, figures.requests_total) == (
        42.0,
        2,
        10,
    )
    assert figures.ttft_s == 0.25
    assert monitor.cluster_figures("other-load", now=1.5).tokens_per_s == 0.0
    # A new plan: a new head runner counts from zero again; the cluster's total does not.
    monitor.observe_sample(
        "a", sample(shard=shard(rank=0, load_id="L2", pid=200), runner=head_runner(0.0, 3)), now=2.0
    )
    monitor.events.record(REQUEST_FAILED, "a", "a", "the head runner failed: peer lost")
    figures = monitor.cluster_figures(now=2.5)
    assert (figures.requests_total, figures.requests_failed, figures.ttft_s) == (13, 1, None)
    # A lost head adds no tokens per second.
    assert monitor.cluster_figures(now=60.0).tokens_per_s == 0.0


def test_status_reply_lists_nodes_in_plan_order_with_their_samples() -> None:
    monitor = Monitor()
    monitor.add_node("b", "mini-b", now=0.0)
    monitor.add_node("a", "mini-a", now=0.0)
    monitor.add_node("c", "spare", now=0.0)
    monitor.observe_sample("b", sample(shard=shard(rank=0), runner=head_runner(10.0, 4)), now=1.0)
    monitor.observe_sample("a", sample(shard=shard(rank=1)), now=1.0)
    monitor.observe_rtt("b", 0.0021)
    nodes = [
        NodeInfo("a", "mini-a", "10.0.0.1:1", "serving", worker_pb2.Hardware(chip="M2 Ultra")),
        NodeInfo("b", "mini-b", "10.0.0.2:1", "serving"),
        NodeInfo("c", "spare", "10.0.0.3:1", "idle"),
    ]
    plan = [Assignment("b", "mini-b", 0, 8, 4 * GB), Assignment("a", "mini-a", 8, 16, 4 * GB)]
    reply = to_status_reply(
        monitor, cluster="lab", model="m", serving=True, problem="", nodes=nodes, plan=plan,
        load_id="L1", now=1.5, wall_now=1000.0,
    )  # fmt: skip
    assert [n.node.node_id for n in reply.nodes] == ["b", "a", "c"]
    b, a, c = reply.nodes
    assert b.node.state == coordinator_pb2.NODE_STATE_SERVING
    assert b.heartbeat_rtt_s == 0.0021 and not a.HasField("heartbeat_rtt_s")
    assert a.node.hardware.chip == "M2 Ultra" and a.last_seen_s == pytest.approx(0.5)
    assert c.node.state == coordinator_pb2.NODE_STATE_IDLE and not c.HasField("sample")
    assert b.sample.memory_used_bytes == 20 * GB and b.node.shard.end_layer == 8
    assert [(p.node_id, p.start_layer, p.end_layer) for p in reply.plan] == [
        ("b", 0, 8),
        ("a", 8, 16),
    ]
    assert (reply.tokens_per_s, reply.requests_total, reply.timestamp) == (10.0, 4, 1000.0)
    assert not reply.HasField("ttft_s")


def test_every_stage_serving_shows_the_pipelines_tokens_per_second() -> None:
    """Only the head runner counts tokens; every stage of its pipeline shares the figure."""
    monitor = Monitor()
    for node_id in ("head", "mid", "tail", "spare"):
        monitor.add_node(node_id, node_id, now=0.0)
    monitor.observe_sample(
        "head", sample(shard=shard(rank=0), runner=head_runner(42.0, 1)), now=1.0
    )
    monitor.observe_sample("mid", sample(shard=shard(rank=1), runner=head_runner(0.0, 0)), now=1.0)
    monitor.observe_sample("tail", sample(shard=shard(LOADING, rank=2)), now=1.0)
    monitor.observe_sample("spare", sample(), now=1.0)
    plan = [Assignment(n, n, 8 * i, 8 * i + 8, GB) for i, n in enumerate(("head", "mid", "tail"))]
    nodes = [NodeInfo(n, n, "", "serving") for n in ("head", "mid", "tail")]
    reply = to_status_reply(
        monitor, cluster="lab", model="m", serving=True, problem="", load_id="L1", now=1.5,
        nodes=[*nodes, NodeInfo("spare", "spare", "", "idle")], plan=plan,
    )  # fmt: skip
    rates = {
        n.node.name: n.pipeline_tokens_per_s if n.HasField("pipeline_tokens_per_s") else None
        for n in reply.nodes
    }
    assert rates == {"head": 42.0, "mid": 42.0, "tail": None, "spare": None}


def test_a_lost_node_shows_no_stale_figures() -> None:
    monitor = Monitor()
    for node_id in ("a", "b"):
        monitor.add_node(node_id, node_id, now=0.0)
        monitor.observe_sample(node_id, sample(shard=shard(rank=0)), now=1.0)
        monitor.observe_rtt(node_id, 0.002)
    monitor.mark_lost("b", "telemetry stream closed")
    nodes = [NodeInfo("a", "a", "", "serving"), NodeInfo("b", "b", "", "serving")]
    plan = [Assignment("a", "a", 0, 8, GB), Assignment("b", "b", 8, 16, GB)]
    reply = to_status_reply(
        monitor, cluster="lab", model="m", serving=True, problem="", nodes=nodes, plan=plan,
        load_id="L1", now=1.5,
    )  # fmt: skip
    a, b = reply.nodes
    assert a.HasField("sample") and a.HasField("heartbeat_rtt_s")
    assert b.node.state == coordinator_pb2.NODE_STATE_LOST
    assert not b.HasField("sample") and not b.HasField("heartbeat_rtt_s")
    assert not b.node.HasField("shard") and not b.HasField("pipeline_tokens_per_s")
    assert b.last_seen_s == pytest.approx(0.5)


# ---- the event log -------------------------------------------------------------------


def test_event_log_is_bounded_in_memory_and_numbered() -> None:
    log = EventLog(capacity=5)
    for i in range(12):
        log.record("plan_changed", message=str(i))
    assert [e.seq for e in log.since(0)] == [8, 9, 10, 11, 12]
    assert [e.message for e in log.since(10)] == ["10", "11"]
    assert log.since(12) == [] and log.counts() == {"plan_changed": 12}


def test_event_log_appends_json_lines_and_resumes_numbering(tmp_path: Path) -> None:
    path = tmp_path / "state" / "events.jsonl"
    log = EventLog(path, clock=lambda: 1700000000.5)
    log.record("node_joined", "n1", "mini-1", "at 10.0.0.1:50151")
    log.record(LOAD_STARTED, message="pomona-demo on 2 workers")
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "seq": 1, "timestamp": 1700000000.5, "kind": "node_joined", "node_id": "n1",
        "node_name": "mini-1", "message": "at 10.0.0.1:50151",
    }  # fmt: skip
    again = EventLog(path)
    assert [e.seq for e in again.since(0)] == [1, 2]
    assert again.record("node_lost", "n1").seq == 3
    again.close()
    assert len(path.read_text().splitlines()) == 3


def test_event_log_file_is_capped_by_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_file_bytes=2_000)
    for i in range(100):
        log.record("request_failed", message=f"request {i} failed: the head runner is gone")
    log.close()
    backup = path.with_name("events.jsonl.1")
    assert path.stat().st_size <= 2_000 and backup.stat().st_size <= 2_000
    kept = [Event.from_json(line) for line in (backup.read_text() + path.read_text()).splitlines()]
    seqs = [e.seq for e in kept if e is not None]
    assert seqs == list(range(seqs[0], 101))


def test_event_log_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"seq": 4, "timestamp": 1.0, "kind": "node_lost"}\n{"seq": 5, "tim')
    log = EventLog(path)
    assert [e.seq for e in log.since(0)] == [4]
    assert log.record("node_returned").seq == 5


def test_follow_sends_the_past_then_new_events_to_every_subscriber() -> None:
    async def main() -> None:
        log = EventLog()
        log.record("node_joined", "n1")
        log.record("node_joined", "n2")

        async def take(after: int, n: int) -> list[int]:
            seqs = []
            async for event in log.follow(after):
                seqs.append(event.seq)
                if len(seqs) == n:
                    break
            return seqs

        first, second = asyncio.create_task(take(0, 4)), asyncio.create_task(take(1, 3))
        await asyncio.sleep(0)
        log.record("plan_changed")
        await asyncio.sleep(0)
        log.record("load_started")
        assert await asyncio.wait_for(asyncio.gather(first, second), 2.0) == [
            [1, 2, 3, 4],
            [2, 3, 4],
        ]

    asyncio.run(main())


def test_a_slow_subscriber_never_blocks_the_recorder() -> None:
    async def main() -> None:
        log = EventLog(capacity=100)
        stuck = log.follow(0)
        log.record("node_joined")
        assert (await anext(stuck)).seq == 1  # then never reads again
        for _ in range(1_000):
            log.record("request_failed")
        seqs = [(await anext(stuck)).seq for _ in range(3)]
        assert seqs == [902, 903, 904]  # it skips what fell out of memory
        await stuck.aclose()

    asyncio.run(main())


def test_close_ends_followers_and_records_from_threads_wake_them() -> None:
    async def main() -> None:
        log = EventLog()
        seen: list[int] = []

        async def follow() -> None:
            async for event in log.follow(0):
                seen.append(event.seq)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        await asyncio.to_thread(log.record, "node_lost", "n1")
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        log.close()
        await asyncio.wait_for(task, 2.0)
        assert seen == [1]

    asyncio.run(main())


def test_stream_without_follow_sends_only_the_past() -> None:
    async def main() -> None:
        log = EventLog()
        for kind in ("node_joined", "plan_changed", "load_finished"):
            log.record(kind)
        events = [e async for e in log.stream(after=1, follow=False)]
        assert [(e.seq, e.kind) for e in events] == [(2, "plan_changed"), (3, "load_finished")]
        assert isinstance(events[0], coordinator_pb2.Event)

    asyncio.run(main())


def test_each_cluster_has_its_own_event_log(tmp_path: Path) -> None:
    from pomona.coordinator.events import events_path

    lab, local = events_path(tmp_path, "lab"), events_path(tmp_path, "local-1a2b3c")
    assert lab.parent == local.parent and lab != local
    # A name that is no file name still gets a file of its own under the directory.
    odd = events_path(tmp_path, "../../etc")
    assert odd.parent == lab.parent and odd not in (lab, local)


def test_only_the_event_logs_of_the_latest_clusters_are_kept(tmp_path: Path) -> None:
    import os

    from pomona.coordinator.events import events_path, prune_event_logs

    paths = [events_path(tmp_path, f"local-{i}") for i in range(12)]
    for i, path in enumerate(paths):
        log = EventLog(path, max_file_bytes=200)
        for _ in range(5):
            log.record("node_joined", message="x" * 60)
        log.close()
        os.utime(path, (1_000 + i, 1_000 + i))
    current = paths[0]  # the oldest, but the one starting now
    deleted = prune_event_logs(current, keep=4)
    left = sorted(p.name for p in current.parent.iterdir())
    assert left == sorted(name for p in (paths[0], *paths[9:]) for name in (p.name, p.name + ".1"))
    assert len(deleted) == 2 * 8
