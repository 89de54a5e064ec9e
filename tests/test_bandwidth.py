"""Measured memory bandwidth, for chips the planner's table does not know."""

from __future__ import annotations

from pathlib import Path

import pytest

from pomona.coordinator.placement import node_spec
from pomona.v1 import worker_pb2
from pomona.worker import bandwidth


def test_measurement_is_positive_and_remembered_per_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = bandwidth.cached_bandwidth_gbs(tmp_path, "machine-a")
    assert first > 0

    def fail(*args: object) -> float:
        raise AssertionError("measured twice")

    monkeypatch.setattr(bandwidth, "measure_bandwidth_gbs", fail)
    assert bandwidth.cached_bandwidth_gbs(tmp_path, "machine-a") == first
    monkeypatch.setattr(bandwidth, "measure_bandwidth_gbs", lambda: 7.0)
    assert bandwidth.cached_bandwidth_gbs(tmp_path, "machine-b") == 7.0


def test_the_planner_gets_the_measured_figure_only_when_there_is_one() -> None:
    hw = worker_pb2.Hardware(total_memory_bytes=64 << 30, chip="Some CPU")
    assert node_spec("n", "n", hw).bandwidth_gbs is None
    hw.measured_bandwidth_gbs = 12.5
    assert node_spec("n", "n", hw).bandwidth_gbs == 12.5
