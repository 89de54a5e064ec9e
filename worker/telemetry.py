"""The worker's Telemetry stream: its own health plus its runner's state, as protobuf.

`sample_to_proto` is the one place where a sampler `NodeSample` (a dataclass) and the
runner's figures become the wire's `NodeSample`. A figure the OS or the runner does not
provide stays unset ("n/a"); nothing is filled in with a made-up number.

`telemetry_stream` owns one `Sampler` per stream: the sampler turns counters into rates
(CPU %, bytes/s) between two of *its* calls, so each stream gets figures for its own
interval; and a stream is normally the coordinator's only one, so the optional power
readers (macmon, powermetrics) run once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

from pomona.v1 import worker_pb2
from pomona.worker import sampler

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INTERVAL_S",
    "MAX_INTERVAL_S",
    "MIN_INTERVAL_S",
    "RunnerState",
    "SamplerLike",
    "effective_interval",
    "runner_stats_to_proto",
    "sample_to_proto",
    "telemetry_stream",
]

DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 60.0

# The runner's state as the daemon knows it: its shard and its stats (keys are
# `RunnerStats` field names; an empty dict when no runner is running).
RunnerState = tuple[worker_pb2.ShardStatus | None, Mapping[str, object]]

_RUNNER_FIELDS = worker_pb2.RunnerStats.DESCRIPTOR.fields_by_name


class SamplerLike(Protocol):
    def sample(self) -> sampler.NodeSample: ...

    def close(self) -> None: ...


def effective_interval(requested_s: float) -> float:
    """`TelemetryRequest.interval_s` -> seconds: 0 means 1; kept within [0.05, 60]."""
    if not math.isfinite(requested_s) or requested_s <= 0:
        return DEFAULT_INTERVAL_S
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, requested_s))


def runner_stats_to_proto(stats: Mapping[str, object]) -> worker_pb2.RunnerStats | None:
    """A stats dict (keys: `RunnerStats` fields) -> proto; None for an empty dict.

    A value of None leaves its field unset; an unknown key or a negative count is a
    programming error of the caller and raises ValueError.
    """
    if not stats:
        return None
    message = worker_pb2.RunnerStats()
    for key, value in stats.items():
        field = _RUNNER_FIELDS.get(key)
        if field is None:
            raise ValueError(
                f"unknown runner stat {key!r}; expected one of {sorted(_RUNNER_FIELDS)}"
            )
        if value is None:
            continue
        if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"runner stat {key}={value!r} is not a finite number")
            setattr(message, key, float(value))
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"runner stat {key}={value!r} is not a count")
            setattr(message, key, value)
    return message


def sample_to_proto(
    sample: sampler.NodeSample,
    node_id: str,
    shard: worker_pb2.ShardStatus | None = None,
    stats: Mapping[str, object] | None = None,
) -> worker_pb2.NodeSample:
    """One sampler sample plus the runner's state -> the wire's `NodeSample`.

    Optional figures that are None stay unset. `cpu_percent` has no presence on the
    wire; the sampler gives None only when no time passed since its previous sample,
    which `telemetry_stream` never does, and 0 is sent then.
    """
    message = worker_pb2.NodeSample(
        timestamp=sample.timestamp,
        node_id=node_id,
        cpu_percent=sample.cpu_percent if sample.cpu_percent is not None else 0.0,
        memory_total_bytes=sample.memory_total_bytes,
        memory_used_bytes=sample.memory_used_bytes,
        memory_available_bytes=sample.memory_available_bytes,
        memory_pressure=sample.memory_pressure or "",
        swap_used_bytes=sample.swap_used_bytes,
        thermal_state=sample.thermal_state or "",
    )
    for name in ("gpu_utilization_percent", "gpu_power_watts", "gpu_temperature_c"):
        value = getattr(sample, name)
        if value is not None:
            setattr(message, name, value)
    if sample.cpu_power_watts is not None:
        message.cpu_power_watts = sample.cpu_power_watts
    for nic in sample.interfaces:
        traffic = message.interfaces.add(
            name=nic.name, bytes_sent=nic.bytes_sent, bytes_received=nic.bytes_recv
        )
        if nic.sent_bytes_per_s is not None:
            traffic.sent_bytes_per_s = nic.sent_bytes_per_s
        if nic.recv_bytes_per_s is not None:
            traffic.received_bytes_per_s = nic.recv_bytes_per_s
    if shard is not None:
        message.shard.CopyFrom(shard)
    runner = runner_stats_to_proto(stats or {})
    if runner is not None:
        message.runner.CopyFrom(runner)
    return message


async def telemetry_stream(
    sampler_factory: Callable[[], SamplerLike],
    runner_state: Callable[[], RunnerState],
    node_id: str,
    interval_s: float,
) -> AsyncIterator[worker_pb2.NodeSample]:
    """One `NodeSample` per interval until the consumer stops or the task is cancelled.

    The sampler is made, read and closed in worker threads (its readers may run
    commands); `runner_state` is called on the event loop, where the daemon keeps that
    state. The first sample comes one interval after the start, so that its CPU % covers
    a whole interval. Ticks run on a fixed schedule; a tick missed while a sample was slow
    is skipped rather than sent late in a burst.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, not {interval_s}")
    source = await asyncio.to_thread(sampler_factory)
    try:
        started = time.monotonic()
        ticks, warned = 0, False
        while True:
            ticks += 1
            delay = started + ticks * interval_s - time.monotonic()
            if delay < 0:
                ticks += math.ceil(-delay / interval_s)
                delay = started + ticks * interval_s - time.monotonic()
            await asyncio.sleep(delay)
            taken = await asyncio.to_thread(source.sample)
            shard, stats = runner_state()
            try:
                message = sample_to_proto(taken, node_id, shard, stats)
            except ValueError as e:
                # The stats come from the runner process: bad ones must not stop the
                # heartbeat, so the sample goes without them.
                if not warned:
                    log.warning("runner stats left out of telemetry: %s", e)
                    warned = True
                message = sample_to_proto(taken, node_id, shard)
            yield message
    finally:
        # Shielded: a second cancellation must not leave the readers' processes behind.
        await asyncio.shield(asyncio.to_thread(_close, source))


def _close(source: SamplerLike) -> None:
    try:
        source.close()
    except Exception:  # a reader that fails to stop must not hide why the stream ended
        log.exception("closing the sampler failed")
