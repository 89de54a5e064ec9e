"""`/metrics`: parses with prometheus-client, agrees with Status, leaves "n/a" out."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from aiohttp import ClientSession, web
from prometheus_client.parser import text_string_to_metric_families

from pomona.coordinator.metrics import make_registry, metrics_route, render
from pomona.coordinator.monitor import Monitor, NodeInfo, to_status_reply
from pomona.coordinator.placement import Assignment
from pomona.status_view import status_json
from pomona.v1 import coordinator_pb2, worker_pb2

GB = 10**9
Samples = dict[str, list[tuple[dict[str, str], float]]]


def build_cluster() -> tuple[Monitor, Callable[[], coordinator_pb2.StatusReply]]:
    """A Mac head with GPU figures, a Linux worker without, a spare that just joined, and
    a node that stopped sending."""
    monitor = Monitor(clock=lambda: 100.0)
    for node_id, name in (("a1", "studio"), ("b2", "linux-box"), ("d4", "gone")):
        monitor.add_node(node_id, name, now=0.0)
    monitor.add_node("c3", "spare", now=99.0)  # just joined, nothing sent yet
    mac = worker_pb2.NodeSample(
        timestamp=1.0, node_id="a1", cpu_percent=55.5, memory_total_bytes=192 * GB,
        memory_used_bytes=120 * GB, memory_available_bytes=70 * GB, memory_pressure="warn",
        swap_used_bytes=2 * GB, gpu_utilization_percent=91.0, gpu_power_watts=48.5,
        gpu_temperature_c=61.0, thermal_state="nominal",
        shard=worker_pb2.ShardStatus(load_id="L1", state=worker_pb2.SHARD_STATE_READY, rank=0,
                                     start_layer=0, end_layer=40, progress=1.0, runner_pid=7),
        runner=worker_pb2.RunnerStats(mlx_active_bytes=90 * GB, mlx_peak_bytes=95 * GB,
                                      tokens_per_s=23.5, requests_in_flight=3, requests_total=17,
                                      ttft_s=0.42, tokens_total=5000),
    )  # fmt: skip
    mac.interfaces.add(name="en0", bytes_sent=10, bytes_received=20, sent_bytes_per_s=1.0)
    linux = worker_pb2.NodeSample(
        timestamp=1.0, node_id="b2", cpu_percent=12.0, memory_total_bytes=64 * GB,
        memory_used_bytes=30 * GB, memory_available_bytes=30 * GB,
        shard=worker_pb2.ShardStatus(load_id="L1", state=worker_pb2.SHARD_STATE_READY, rank=1,
                                     start_layer=40, end_layer=80, progress=1.0, runner_pid=8),
        runner=worker_pb2.RunnerStats(mlx_active_bytes=30 * GB),
    )  # fmt: skip
    monitor.observe_sample("d4", worker_pb2.NodeSample(memory_total_bytes=GB), now=1.0)
    monitor.observe_sample("a1", mac, now=99.5)
    monitor.observe_sample("b2", linux, now=99.5)
    monitor.observe_rtt("a1", 0.0015)
    monitor.events.record("request_failed", "a1", "studio", "peer lost")
    monitor.refresh({"a1": "serving", "b2": "serving", "c3": "idle", "d4": "idle"})
    nodes = [
        NodeInfo("a1", "studio", "10.0.0.1:50151", "serving"),
        NodeInfo("b2", "linux-box", "10.0.0.2:50151", "serving"),
        NodeInfo("c3", "spare", "10.0.0.3:50151", "idle"),
        NodeInfo("d4", "gone", "10.0.0.4:50151", "idle"),
    ]
    plan = [
        Assignment("a1", "studio", 0, 40, 70 * GB),
        Assignment("b2", "linux-box", 40, 80, 70 * GB),
    ]

    def status() -> coordinator_pb2.StatusReply:
        return to_status_reply(
            monitor, cluster="lab", model="llama-70b", serving=True, problem="",
            nodes=nodes, plan=plan, load_id="L1",
        )  # fmt: skip

    return monitor, status


def scrape() -> tuple[Samples, coordinator_pb2.StatusReply, Monitor]:
    monitor, status = build_cluster()
    body, content_type = render(make_registry(status, monitor.events.counts))
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples, status(), monitor


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_node_figures_agree_with_the_status_reply() -> None:
    samples, reply, _ = scrape()
    for status in reply.nodes:
        if not status.HasField("sample"):
            continue
        node, sample = status.node.name, status.sample
        assert (
            value(samples, "pomona_node_memory_used_bytes", node=node) == sample.memory_used_bytes
        )
        assert (
            value(samples, "pomona_node_memory_total_bytes", node=node) == sample.memory_total_bytes
        )
        assert value(samples, "pomona_node_cpu_percent", node=node) == sample.cpu_percent
        assert value(samples, "pomona_node_swap_used_bytes", node=node) == sample.swap_used_bytes
    assert value(samples, "pomona_node_gpu_power_watts", node="studio") == 48.5
    assert value(samples, "pomona_node_gpu_temperature_celsius", node="studio") == 61.0
    assert (
        value(samples, "pomona_node_heartbeat_rtt_seconds", node="studio", node_id="a1") == 0.0015
    )
    assert value(samples, "pomona_runner_mlx_active_bytes", node="linux-box") == 30 * GB
    assert value(samples, "pomona_node_layers", node="linux-box") == 40
    # Only the head counts tokens; both stages of its pipeline show the pipeline's rate.
    for node in ("studio", "linux-box"):
        assert value(samples, "pomona_node_pipeline_tokens_per_second", node=node) == 23.5
    assert value(samples, "pomona_node_memory_pressure", node="studio") == 1
    assert (
        value(samples, "pomona_node_network_transmit_bytes_total", node="studio", interface="en0")
        == 10
    )


def test_cluster_figures_agree_with_the_json_of_status() -> None:
    samples, reply, _ = scrape()
    doc = status_json(reply)
    assert value(samples, "pomona_cluster_tokens_per_second") == doc["tokens_per_s"] == 23.5
    assert value(samples, "pomona_cluster_ttft_seconds") == doc["ttft_s"] == 0.42
    assert value(samples, "pomona_cluster_requests_total") == int(doc["requests_total"]) == 17
    assert (
        value(samples, "pomona_cluster_requests_failed_total") == int(doc["requests_failed"]) == 1
    )
    assert value(samples, "pomona_cluster_requests_in_flight") == doc["requests_in_flight"] == 3
    assert value(samples, "pomona_cluster_serving") == 1
    assert value(samples, "pomona_cluster_info", model="llama-70b", load_id="L1") == 1
    states = {s["node"]["name"]: s["node"]["state"] for s in doc["nodes"]}
    assert states == {
        "studio": "NODE_STATE_SERVING",
        "linux-box": "NODE_STATE_SERVING",
        "spare": "NODE_STATE_IDLE",
        "gone": "NODE_STATE_LOST",
    }
    for name, state in states.items():
        up = 0 if state == "NODE_STATE_LOST" else 1
        assert value(samples, "pomona_node_up", node=name) == up
        assert value(samples, "pomona_node_state", node=name) == 1
        assert [lab["state"] for lab, _ in samples["pomona_node_state"] if lab["node"] == name] == [
            state.removeprefix("NODE_STATE_").lower()
        ]
    assert value(samples, "pomona_cluster_nodes", state="serving") == 2
    assert value(samples, "pomona_events_total", kind="request_failed") == 1
    assert value(samples, "pomona_events_total", kind="node_joined") == 4


def test_figures_not_known_are_absent_not_zero() -> None:
    samples, _, _ = scrape()

    def nodes_with(name: str) -> set[str]:
        return {labels["node"] for labels, _ in samples.get(name, [])}

    for name in ("gpu_power_watts", "gpu_utilization_percent", "gpu_temperature_celsius"):
        assert nodes_with(f"pomona_node_{name}") == {"studio"}
    assert nodes_with("pomona_node_cpu_power_watts") == set()
    assert nodes_with("pomona_node_thermal_state") == {"studio"}
    assert nodes_with("pomona_node_memory_pressure") == {"studio"}
    assert nodes_with("pomona_node_heartbeat_rtt_seconds") == {"studio"}
    assert nodes_with("pomona_runner_ttft_seconds") == {"studio"}
    # A lost node's last figures are stale: absent too.
    assert nodes_with("pomona_node_memory_used_bytes") == {"studio", "linux-box"}
    assert nodes_with("pomona_node_last_seen_seconds") == {"studio", "linux-box", "gone"}
    assert nodes_with("pomona_runner_mlx_active_bytes") == {"studio", "linux-box"}


def test_no_ttft_means_no_ttft_metric() -> None:
    monitor = Monitor()

    def status() -> coordinator_pb2.StatusReply:
        return to_status_reply(monitor, cluster="c", model="m", serving=False,
                               problem="waiting for workers", nodes=[])  # fmt: skip

    body, _ = render(make_registry(status, monitor.events.counts))
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "pomona_cluster_ttft_seconds" not in names
    assert {"pomona_cluster_serving", "pomona_cluster_requests", "pomona_events"} <= names


def test_openmetrics_is_served_to_who_asks_for_it() -> None:
    monitor, status = build_cluster()
    body, content_type = render(
        make_registry(status, monitor.events.counts), "application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_route_serves_the_exposition_over_http(free_port: int) -> None:
    monitor, status = build_cluster()

    async def main() -> tuple[int, str, str]:
        app = web.Application()
        app.add_routes([metrics_route(status, monitor.events.counts)])
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", free_port).start()
        try:
            async with (
                ClientSession() as session,
                session.get(f"http://127.0.0.1:{free_port}/metrics") as response,
            ):
                return response.status, response.headers["Content-Type"], await response.text()
        finally:
            await runner.cleanup()

    code, content_type, text = asyncio.run(main())
    assert code == 200 and content_type.startswith("text/plain; version=")
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "pomona_node_memory_used_bytes" in families
