"""The worker's Telemetry stream: honest conversion and a steady, cancellable stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import psutil
import pytest

from pomona.v1 import worker_pb2
from pomona.worker.sampler import InterfaceTraffic, NodeSample, Sampler
from pomona.worker.telemetry import (
    effective_interval,
    runner_stats_to_proto,
    sample_to_proto,
    telemetry_stream,
)

GB = 10**9


def linux_like_sample(**changes: object) -> NodeSample:
    """What a Linux machine without GPU readers gives: no GPU, power or thermal figures."""
    values: dict[str, object] = {
        "timestamp": 1_700_000_000.25,
        "cpu_percent": 37.5,
        "memory_total_bytes": 64 * GB,
        "memory_used_bytes": 21 * GB,
        "memory_available_bytes": 40 * GB,
        "memory_pressure": None,
        "swap_used_bytes": 0,
        "gpu_utilization_percent": None,
        "gpu_power_watts": None,
        "gpu_temperature_c": None,
        "cpu_power_watts": None,
        "thermal_state": None,
        "power_sources": (),
        "interfaces": (
            InterfaceTraffic("eth0", 1000, 2000, None, None),
            InterfaceTraffic("en5", 10, 20, 1.5, 0.0),
        ),
    }
    values.update(changes)
    return NodeSample(**values)  # type: ignore[arg-type]


def test_figures_the_os_does_not_give_stay_unset() -> None:
    message = sample_to_proto(linux_like_sample(), "node-1")
    for name in ("gpu_utilization_percent", "gpu_power_watts", "gpu_temperature_c"):
        assert not message.HasField(name)
    assert not message.HasField("cpu_power_watts")
    assert (message.memory_pressure, message.thermal_state) == ("", "")
    assert not message.HasField("shard") and not message.HasField("runner")
    first, second = message.interfaces
    assert (first.name, first.bytes_sent, first.bytes_received) == ("eth0", 1000, 2000)
    assert not first.HasField("sent_bytes_per_s") and not first.HasField("received_bytes_per_s")
    assert second.sent_bytes_per_s == 1.5 and second.HasField("received_bytes_per_s")
    assert (message.node_id, message.cpu_percent, message.memory_used_bytes) == (
        "node-1",
        37.5,
        21 * GB,
    )


def test_figures_the_os_gives_are_carried_even_when_zero() -> None:
    message = sample_to_proto(
        linux_like_sample(
            gpu_utilization_percent=0.0,
            gpu_power_watts=4.25,
            gpu_temperature_c=51.0,
            cpu_power_watts=0.0,
            memory_pressure="warn",
            thermal_state="fair",
        ),
        "node-1",
    )
    assert message.HasField("gpu_utilization_percent") and message.gpu_utilization_percent == 0.0
    assert (message.gpu_power_watts, message.gpu_temperature_c) == (4.25, 51.0)
    assert message.HasField("cpu_power_watts")
    assert (message.memory_pressure, message.thermal_state) == ("warn", "fair")


def test_runner_state_is_carried_and_its_unknowns_stay_unset() -> None:
    shard = worker_pb2.ShardStatus(
        load_id="L1", state=worker_pb2.SHARD_STATE_READY, start_layer=0, end_layer=12, rank=0
    )
    stats = {"mlx_active_bytes": 3 * GB, "tokens_per_s": 41.5, "requests_in_flight": 2}
    message = sample_to_proto(linux_like_sample(), "n", shard, {**stats, "ttft_s": None})
    assert message.shard == shard
    assert message.runner.mlx_active_bytes == 3 * GB and message.runner.tokens_per_s == 41.5
    assert not message.runner.HasField("ttft_s")
    with_ttft = sample_to_proto(linux_like_sample(), "n", shard, {**stats, "ttft_s": 0.0})
    assert with_ttft.runner.HasField("ttft_s")


@pytest.mark.parametrize(
    ("stats", "words"),
    [
        ({"tokens_per_second": 3.0}, "unknown runner stat 'tokens_per_second'"),
        ({"mlx_active_bytes": -1}, "is not a count"),
        ({"requests_in_flight": 1.5}, "is not a count"),
        ({"tokens_per_s": float("nan")}, "is not a finite number"),
    ],
)
def test_bad_runner_stats_are_refused(stats: Mapping[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        runner_stats_to_proto(stats)


def test_no_runner_means_no_runner_stats() -> None:
    assert runner_stats_to_proto({}) is None


def test_a_real_sample_here_matches_psutil() -> None:
    with Sampler(sources=[]) as sampler:
        time.sleep(0.05)
        message = sample_to_proto(sampler.sample(), "here")
    memory = psutil.virtual_memory()
    assert message.memory_total_bytes == memory.total
    assert abs(message.memory_used_bytes - memory.used) < memory.total * 0.05
    assert not message.HasField("gpu_power_watts")
    assert {nic.name for nic in message.interfaces} >= {"lo"}


@pytest.mark.parametrize(
    ("asked", "used"), [(0.0, 1.0), (-3.0, 1.0), (0.01, 0.05), (0.5, 0.5), (1e9, 60.0)]
)
def test_requested_interval_is_kept_sane(asked: float, used: float) -> None:
    assert effective_interval(asked) == used


class FakeSampler:
    def __init__(self) -> None:
        self.calls: list[float] = []
        self.closed = threading.Event()
        self.thread_ids: set[int] = set()

    def sample(self) -> NodeSample:
        self.thread_ids.add(threading.get_ident())
        self.calls.append(time.monotonic())
        return linux_like_sample(cpu_percent=float(len(self.calls)))

    def close(self) -> None:
        self.closed.set()


def test_stream_yields_once_per_interval_and_stops_on_cancel() -> None:
    fake = FakeSampler()
    interval = 0.1
    received: list[tuple[float, worker_pb2.NodeSample]] = []

    async def main() -> None:
        shard = worker_pb2.ShardStatus(state=worker_pb2.SHARD_STATE_READY, rank=1)

        async def consume() -> None:
            stream = telemetry_stream(
                lambda: fake, lambda: (shard, {"tokens_per_s": 1.0}), "n1", interval
            )
            async for message in stream:
                received.append((time.monotonic(), message))

        started = time.monotonic()
        task = asyncio.create_task(consume())
        while len(received) < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        calls_at_cancel = len(fake.calls)
        await asyncio.sleep(3 * interval)
        assert len(fake.calls) == calls_at_cancel
        assert received[0][0] - started >= interval * 0.9
        gaps = [b[0] - a[0] for a, b in zip(received, received[1:], strict=False)]
        assert min(gaps) >= interval * 0.5, gaps
        # On a fixed schedule: the mean gap is the interval, not the interval plus drift
        # (generous bounds: the test machine may be busy).
        assert interval * 0.8 <= (received[4][0] - received[0][0]) / 4 <= interval * 2, gaps

    asyncio.run(main())
    assert fake.closed.is_set()
    assert threading.get_ident() not in fake.thread_ids  # sampled in a worker thread
    assert [int(m.cpu_percent) for _, m in received[:5]] == [1, 2, 3, 4, 5]
    assert all(
        m.node_id == "n1" and m.shard.rank == 1 and m.runner.tokens_per_s == 1.0
        for _, m in received
    )


def test_stream_closes_the_sampler_when_the_consumer_stops() -> None:
    fake = FakeSampler()

    async def main() -> None:
        stream = telemetry_stream(lambda: fake, lambda: (None, {}), "n1", 0.01)
        first = await anext(stream)
        assert not first.HasField("runner") and not first.HasField("shard")
        await stream.aclose()

    asyncio.run(main())
    assert fake.closed.is_set()


def test_stream_refuses_a_non_positive_interval() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="interval_s"):
            await anext(telemetry_stream(FakeSampler, lambda: (None, {}), "n1", 0.0))

    asyncio.run(main())


def test_bad_runner_stats_do_not_stop_the_heartbeat(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeSampler()

    async def main() -> list[worker_pb2.NodeSample]:
        stream = telemetry_stream(lambda: fake, lambda: (None, {"event": "stats"}), "n1", 0.01)
        try:
            return [await anext(stream) for _ in range(3)]
        finally:
            await stream.aclose()

    messages = asyncio.run(main())
    assert [m.HasField("runner") for m in messages] == [False, False, False]
    assert [m.memory_used_bytes for m in messages] == [21 * GB] * 3
    assert sum("runner stats left out" in r.message for r in caplog.records) == 1
