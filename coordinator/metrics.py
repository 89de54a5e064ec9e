"""Prometheus exposition of the cluster's health, for `GET /metrics` on the HTTP port.

Built at scrape time from the same `StatusReply` that `Coordinator.Status` returns, so
`/metrics`, `pomona status --json` and the table can never disagree. A figure that is
"n/a" in the reply (an unset optional field, an unknown pressure or thermal state, a
node without a runner) is left out of the exposition rather than exported as 0.
Names follow Prometheus conventions: base units (bytes, seconds, watts, celsius),
`_total` for counters; labels `node` (the worker's name) and `node_id` (its stable id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from pomona.coordinator.monitor import NodeState
from pomona.v1 import coordinator_pb2

__all__ = ["PomonaCollector", "make_registry", "metrics_route", "render"]

StatusGetter = Callable[[], coordinator_pb2.StatusReply]
EventCounts = Callable[[], Mapping[str, int]]

PRESSURE_LEVELS = {"normal": 0, "warn": 1, "critical": 2}
THERMAL_LEVELS = {"nominal": 0, "fair": 1, "serious": 2, "critical": 3}
NODE_LABELS = ["node", "node_id"]

# (metric suffix, NodeSample field, help): gauges set whenever a sample exists.
_NODE_GAUGES = (
    ("cpu_percent", "cpu_percent", "CPU busy, percent of all cores, over the last interval."),
    ("memory_total_bytes", "memory_total_bytes", "Physical memory."),
    ("memory_used_bytes", "memory_used_bytes", "Memory in use."),
    ("memory_available_bytes", "memory_available_bytes", "Memory available without swapping."),
    ("swap_used_bytes", "swap_used_bytes", "Swap in use."),
)
# Optional NodeSample fields: exported only when the OS provided them.
_NODE_OPTIONAL = (
    ("gpu_utilization_percent", "gpu_utilization_percent", "GPU busy, percent."),
    ("gpu_power_watts", "gpu_power_watts", "GPU power draw."),
    ("gpu_temperature_celsius", "gpu_temperature_c", "GPU temperature."),
    ("cpu_power_watts", "cpu_power_watts", "CPU power draw."),
)
# RunnerStats fields: exported for nodes whose runner reports them.
_RUNNER_GAUGES = (
    ("mlx_active_bytes", "mlx_active_bytes", "MLX memory in active arrays."),
    ("mlx_peak_bytes", "mlx_peak_bytes", "Peak MLX memory since the runner started."),
    ("mlx_cache_bytes", "mlx_cache_bytes", "MLX buffer cache."),
    ("rss_bytes", "rss_bytes", "Resident memory of the runner process."),
    ("tokens_per_second", "tokens_per_s", "Tokens produced per second (head runner)."),
    ("requests_in_flight", "requests_in_flight", "Requests being generated."),
    ("requests_waiting", "requests_waiting", "Requests queued."),
    ("prompt_cache_bytes", "prompt_cache_bytes", "Prefix KV cache held per stage (head runner)."),
    (
        "prompt_cache_budget_bytes",
        "prompt_cache_budget_bytes",
        "Prefix KV cache budget per stage (head runner).",
    ),
)
_RUNNER_COUNTERS = (
    ("tokens", "tokens_total", "Tokens produced by this runner since it started."),
    ("requests", "requests_total", "Requests taken by this runner since it started."),
    ("prompt_cache_lookups", "prompt_cache_lookups", "Prompts looked up in the prefix cache."),
    ("prompt_cache_hits", "prompt_cache_hits", "Prompts that hit the prefix cache."),
    (
        "prompt_cache_hit_tokens",
        "prompt_cache_hit_tokens",
        "Prompt tokens restored from the prefix cache instead of prefilled.",
    ),
    ("draft_tokens", "draft_tokens", "Tokens the draft model proposed (speculative decoding)."),
    ("draft_accepted_tokens", "draft_accepted_tokens", "Drafted tokens the target accepted."),
    ("verify_steps", "verify_steps", "Verify steps of drafted tokens through the pipeline."),
    ("verify_tokens", "verify_tokens", "Tokens the verify steps produced."),
)


class PomonaCollector(Collector):
    """Collects from a fresh `StatusReply` and the event log's counts at each scrape."""

    def __init__(self, status: StatusGetter, event_counts: EventCounts) -> None:
        self._status = status
        self._event_counts = event_counts

    def collect(self) -> Iterator[Metric]:
        reply = self._status()
        yield from _cluster_metrics(reply)
        yield from _node_metrics(reply)
        yield from _transfer_metrics(reply)
        events = CounterMetricFamily(
            "pomona_events", "Events recorded since the coordinator started.", labels=["kind"]
        )
        for kind, count in sorted(self._event_counts().items()):
            events.add_metric([kind], count)
        yield events


def _cluster_metrics(reply: coordinator_pb2.StatusReply) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "pomona_cluster_info",
        "The cluster, its model and load.",
        labels=["cluster", "model", "load_id"],
    )
    info.add_metric([reply.cluster, reply.model, reply.load_id], 1)
    yield info
    yield GaugeMetricFamily(
        "pomona_cluster_serving", "1 when the cluster serves its model.", value=int(reply.serving)
    )
    yield GaugeMetricFamily(
        "pomona_cluster_tokens_per_second",
        "Tokens produced per second, summed over head runners.",
        value=reply.tokens_per_s,
    )
    if reply.HasField("ttft_s"):
        yield GaugeMetricFamily(
            "pomona_cluster_ttft_seconds",
            "Mean time to first token, last minute.",
            value=reply.ttft_s,
        )
    yield GaugeMetricFamily(
        "pomona_cluster_prompt_cache_bytes",
        "Prefix KV cache held per stage.",
        value=reply.prompt_cache_bytes,
    )
    yield GaugeMetricFamily(
        "pomona_cluster_prompt_cache_budget_bytes",
        "Prefix KV cache budget per stage.",
        value=reply.prompt_cache_budget_bytes,
    )
    if reply.HasField("draft_acceptance_rate"):
        yield GaugeMetricFamily(
            "pomona_cluster_draft_acceptance_ratio",
            "Share of drafted tokens the target accepted (speculative decoding).",
            value=reply.draft_acceptance_rate,
        )
    if reply.HasField("tokens_per_verify_step"):
        yield GaugeMetricFamily(
            "pomona_cluster_tokens_per_verify_step",
            "Tokens each verify step produced (speculative decoding).",
            value=reply.tokens_per_verify_step,
        )
    if reply.HasField("prompt_cache_hit_rate"):
        yield GaugeMetricFamily(
            "pomona_cluster_prompt_cache_hit_ratio",
            "Share of prompts that hit the prefix cache since the runner started.",
            value=reply.prompt_cache_hit_rate,
        )
    yield GaugeMetricFamily(
        "pomona_cluster_requests_in_flight",
        "Requests being generated.",
        value=reply.requests_in_flight,
    )
    yield CounterMetricFamily(
        "pomona_cluster_requests", "Requests taken by head runners.", value=reply.requests_total
    )
    yield CounterMetricFamily(
        "pomona_cluster_requests_failed",
        "Requests that ended in an error.",
        value=reply.requests_failed,
    )
    nodes = GaugeMetricFamily("pomona_cluster_nodes", "Nodes in each state.", labels=["state"])
    for state in NodeState:
        count = sum(1 for n in reply.nodes if n.node.state == state.to_proto())
        nodes.add_metric([state.value], count)
    yield nodes


_TRANSFER_GAUGES = (
    ("bytes_received", "bytes_received", "Bytes received by the node's latest stage transfer."),
    ("bytes_done", "bytes_done", "Bytes of the node's stage verified and written so far."),
    ("bytes_total", "bytes_total", "Bytes of the node's stage."),
    ("bytes_per_second", "bytes_per_s", "Receive rate of the node's latest stage transfer."),
)


def _transfer_metrics(reply: coordinator_pb2.StatusReply) -> Iterator[Metric]:
    """Stage transfers of the last load or pull (model distribution), by node."""
    for suffix, field, help_text in _TRANSFER_GAUGES:
        gauge = GaugeMetricFamily(f"pomona_transfer_{suffix}", help_text, labels=NODE_LABELS)
        for t in reply.transfers:
            gauge.add_metric([t.name, t.node_id], float(getattr(t.progress, field)))
        yield gauge


def _node_metrics(reply: coordinator_pb2.StatusReply) -> Iterator[Metric]:
    def gauge(suffix: str, help_text: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"pomona_{suffix}", help_text, labels=[*NODE_LABELS, *extra])

    up = gauge("node_up", "1 unless the node is lost.")
    state = gauge("node_state", "1 for the node's current state.", ("state",))
    seen = gauge("node_last_seen_seconds", "Seconds since the node's last sample.")
    rtt = gauge("node_heartbeat_rtt_seconds", "Round-trip time of the last heartbeat.")
    layers = gauge("node_layers", "Layers of the model the node holds.")
    pipeline = gauge(
        "node_pipeline_tokens_per_second", "Tokens per second of the pipeline the node serves."
    )
    progress = gauge("node_loading_progress_ratio", "Share of the shard's weights loaded, 0..1.")
    pressure = gauge("node_memory_pressure", "Memory pressure: 0 normal, 1 warn, 2 critical.")
    thermal = gauge("node_thermal_state", "0 nominal, 1 fair, 2 serious, 3 critical.")
    plain = {s: gauge(f"node_{s}", h) for s, _, h in _NODE_GAUGES + _NODE_OPTIONAL}
    runner = {s: gauge(f"runner_{s}", h) for s, _, h in _RUNNER_GAUGES}
    runner_ttft = gauge("runner_ttft_seconds", "Mean time to first token, last minute.")
    runner_counters = {
        s: CounterMetricFamily(f"pomona_runner_{s}", h, labels=NODE_LABELS)
        for s, _, h in _RUNNER_COUNTERS
    }
    sent = CounterMetricFamily(
        "pomona_node_network_transmit_bytes",
        "Bytes sent since boot.",
        labels=[*NODE_LABELS, "interface"],
    )
    received = CounterMetricFamily(
        "pomona_node_network_receive_bytes",
        "Bytes received since boot.",
        labels=[*NODE_LABELS, "interface"],
    )
    for status in reply.nodes:
        node = status.node
        labels = [node.name, node.node_id]
        up.add_metric(labels, 0 if node.state == coordinator_pb2.NODE_STATE_LOST else 1)
        state_name = coordinator_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_").lower()
        state.add_metric([*labels, state_name], 1)
        if status.HasField("heartbeat_rtt_s"):
            rtt.add_metric(labels, status.heartbeat_rtt_s)
        if node.shard.end_layer > node.shard.start_layer:
            layers.add_metric(labels, node.shard.end_layer - node.shard.start_layer)
        if status.HasField("pipeline_tokens_per_s"):
            pipeline.add_metric(labels, status.pipeline_tokens_per_s)
        if status.HasField("sample") or node.state == coordinator_pb2.NODE_STATE_LOST:
            seen.add_metric(labels, status.last_seen_s)
        if not status.HasField("sample"):
            continue
        sample = status.sample
        if sample.HasField("shard"):
            progress.add_metric(labels, sample.shard.progress)
        for suffix, name, _ in _NODE_GAUGES:
            plain[suffix].add_metric(labels, getattr(sample, name))
        for suffix, name, _ in _NODE_OPTIONAL:
            if sample.HasField(name):
                plain[suffix].add_metric(labels, getattr(sample, name))
        if sample.memory_pressure in PRESSURE_LEVELS:
            pressure.add_metric(labels, PRESSURE_LEVELS[sample.memory_pressure])
        if sample.thermal_state in THERMAL_LEVELS:
            thermal.add_metric(labels, THERMAL_LEVELS[sample.thermal_state])
        for nic in sample.interfaces:
            sent.add_metric([*labels, nic.name], nic.bytes_sent)
            received.add_metric([*labels, nic.name], nic.bytes_received)
        if sample.HasField("runner"):
            for suffix, name, _ in _RUNNER_GAUGES:
                runner[suffix].add_metric(labels, getattr(sample.runner, name))
            for suffix, name, _ in _RUNNER_COUNTERS:
                runner_counters[suffix].add_metric(labels, getattr(sample.runner, name))
            if sample.runner.HasField("ttft_s"):
                runner_ttft.add_metric(labels, sample.runner.ttft_s)
    yield from (up, state, seen, rtt, layers, pipeline, progress, pressure, thermal)
    yield from plain.values()
    yield from (*runner.values(), runner_ttft)
    yield from runner_counters.values()
    yield from (sent, received)


def make_registry(status: StatusGetter, event_counts: EventCounts) -> CollectorRegistry:
    """A private registry (not the process-wide default) holding only Pomona's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PomonaCollector(status, event_counts))
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format `accept` asks for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def metrics_route(status: StatusGetter, event_counts: EventCounts) -> web.RouteDef:
    """`GET /metrics` for the coordinator's aiohttp app.

    `status` builds the current `StatusReply` (what `Coordinator.Status` returns);
    `event_counts` is usually `monitor.events.counts`.
    """
    registry = make_registry(status, event_counts)

    async def handler(request: web.Request) -> web.Response:
        body, content_type = render(registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return web.get("/metrics", handler)
