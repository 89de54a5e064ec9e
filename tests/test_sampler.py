"""Health sampling: GPU/power parsers on recorded outputs, real figures on this machine."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from macos_recordings import macmon_lines, recorded_bytes, recordings

from pomona.worker.power_sources import (
    MacmonSource,
    NvmlSource,
    PowermetricsSource,
    PowerReading,
    default_sources,
    empty_reading,
    merge_readings,
    parse_macmon_line,
    parse_powermetrics_plist,
    thermal_state,
)
from pomona.worker.sampler import (
    MEMORY_PRESSURE_LEVELS,
    NodeSample,
    Sampler,
    cpu_percent_between,
    memory_pressure_from_psi,
    parse_memorystatus_level,
    parse_psi,
    rate,
)

# The "real figures here" tests describe a Linux machine without NVIDIA GPUs (like CI's).
linux_without_gpu = pytest.mark.skipif(
    sys.platform != "linux" or importlib.util.find_spec("pynvml") is not None,
    reason="expects Linux without pynvml",
)
T = TypeVar("T")


def wait_until(get: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 5.0) -> T:
    """Poll `get()` until `done` holds: waiting for a state, not for a fixed time."""
    deadline = time.monotonic() + timeout_s
    while not done(value := get()):
        assert time.monotonic() < deadline, f"timed out; last value {value!r}"
        time.sleep(0.02)
    return value


def reading(
    gpu_utilization_percent: float | None = None,
    gpu_power_watts: float | None = None,
    gpu_temperature_c: float | None = None,
    cpu_power_watts: float | None = None,
    thermal: str | None = None,
) -> PowerReading:
    return PowerReading(
        gpu_utilization_percent=gpu_utilization_percent,
        gpu_power_watts=gpu_power_watts,
        gpu_temperature_c=gpu_temperature_c,
        cpu_power_watts=cpu_power_watts,
        thermal_state=thermal,
    )


class FixedSource:
    def __init__(self, name: str, value: PowerReading | None, available: bool = True) -> None:
        self.name = name
        self.value = value
        self.is_available = available
        self.closed = False

    def available(self) -> bool:
        return self.is_available

    def read(self) -> PowerReading | None:
        return self.value

    def close(self) -> None:
        self.closed = True


# ---- powermetrics --------------------------------------------------------------------


M4_MAX_PLIST = "powermetrics_plist__pause-monitor_Mac16-5_M4Max_macOS26.2.plist"
SOCPOWER_PLIST = "powermetrics_plist__macadmins-osquery-ext_socpower_trimmed.plist"
THERMAL_PLIST = "powermetrics_plist__macadmins-osquery-ext_thermal_Mac16-6_trimmed.plist"

# Every recorded powermetrics plist: what the record shows (power in mW / 1000).
POWERMETRICS_RECORDINGS = {
    M4_MAX_PLIST: reading(100 * (1 - 0.877343), 0.269614, None, 2.97845, "nominal"),
    SOCPOWER_PLIST: reading(100 * (1 - 0.901357), 0.169958, None, 9.92435, None),
    THERMAL_PLIST: reading(thermal="nominal"),
}


def test_every_powermetrics_recording_is_in_the_table() -> None:
    assert set(recordings("powermetrics_plist")) == set(POWERMETRICS_RECORDINGS)


@pytest.mark.parametrize("name", sorted(POWERMETRICS_RECORDINGS))
def test_each_recorded_powermetrics_plist_gives_its_figures(name: str) -> None:
    figures = parse_powermetrics_plist(recorded_bytes(name))
    assert figures == pytest.approx(POWERMETRICS_RECORDINGS[name])


def test_powermetrics_energy_only_releases_give_power_from_energy_over_time() -> None:
    figures = parse_powermetrics_plist(recorded_bytes("powermetrics_energy_only_m1_max.plist"))
    elapsed_s = 1002403375 / 1e9
    assert figures["gpu_utilization_percent"] == 50.0
    assert figures["gpu_power_watts"] == pytest.approx(12000 / 1000 / elapsed_s)
    assert figures["cpu_power_watts"] == pytest.approx(1500 / 1000 / elapsed_s)
    assert figures["thermal_state"] == "fair"


def powermetrics_stream() -> bytes:
    """What a continuous `powermetrics -f plist` prints: records, each ended by a NUL."""
    return b"".join(
        recorded_bytes(n) + b"\x00" for n in (SOCPOWER_PLIST, THERMAL_PLIST, M4_MAX_PLIST)
    )


def test_powermetrics_record_with_its_nul_separator_still_parses() -> None:
    first, second, third, tail = powermetrics_stream().split(b"\x00")
    assert tail == b""
    assert parse_powermetrics_plist(b"\x00" + second)["thermal_state"] == "nominal"
    assert parse_powermetrics_plist(first + b"\x00")["gpu_power_watts"] == pytest.approx(0.169958)
    assert parse_powermetrics_plist(b"\x00" + third + b"\x00")["cpu_power_watts"] == pytest.approx(
        2.97845
    )


def test_powermetrics_garbage_is_a_value_error() -> None:
    for garbage in (b"", b"powermetrics: must be invoked as the superuser\n", b"<plist>"):
        with pytest.raises(ValueError):
            parse_powermetrics_plist(garbage)


def test_thermal_pressure_names_map_to_the_four_thermal_states() -> None:
    assert [thermal_state(p) for p in ("Nominal", "Moderate", "Heavy", "Trapping")] == [
        "nominal",
        "fair",
        "serious",
        "critical",
    ]
    assert thermal_state("Sleeping") == "critical"
    assert thermal_state("Light") == "fair"
    assert thermal_state("Unheard-of") is None
    assert thermal_state(None) is None


# ---- macmon ----------------------------------------------------------------------------


BESZEL = "macmon_pipe__beszel-issue-1796_16GB.jsonl"
ISSUE_26 = "macmon_pipe__macmon-issue-26_annotated_24GB.jsonc"
M1_MAX = "macmon_pipe__apple-silicon-monitor_M1Max_v0.8_pydict.py"

# Every recorded macmon sample. Busy is `gpu_active_ratio` where macmon 0.8+ gives it
# (the M1 Max: 69 %, where the frequency-scaled `gpu_usage[1]` says 21 %), else
# `gpu_usage[1]`; 0.0 °C is macmon finding no sensor.
MACMON_RECORDINGS = {
    BESZEL: reading(100 * 0.004153179936110973, 0.004442947451025248, None, 0.25233203172683716),
    ISSUE_26: reading(100 * 0.021497859, 0.017451683, 36.95167, 0.20486385),
    M1_MAX: reading(
        100 * 0.6921621561050415, 1.1298161745071411, 52.1805419921875, 1.3708608150482178
    ),
}


def test_every_macmon_recording_is_in_the_table() -> None:
    assert set(recordings("macmon_pipe")) == set(MACMON_RECORDINGS)


@pytest.mark.parametrize("name", sorted(MACMON_RECORDINGS))
def test_each_recorded_macmon_sample_gives_its_figures(name: str) -> None:
    (line,) = macmon_lines(name)
    assert parse_macmon_line(line) == pytest.approx(MACMON_RECORDINGS[name])


@pytest.mark.parametrize("celsius", [0.0, 5.0, 3.5, -1.0, -40.0])
def test_macmon_gpu_temperatures_no_working_gpu_has_are_not_readings(celsius: float) -> None:
    doc = json.loads(macmon_lines(ISSUE_26)[0])
    doc["temp"]["gpu_temp_avg"] = celsius
    assert parse_macmon_line(json.dumps(doc))["gpu_temperature_c"] is None
    doc["temp"]["gpu_temp_avg"] = 5.5
    assert parse_macmon_line(json.dumps(doc))["gpu_temperature_c"] == 5.5


def test_macmon_garbage_is_a_value_error() -> None:
    for garbage in ("", "[1, 2]", "macmon: command not found"):
        with pytest.raises(ValueError):
            parse_macmon_line(garbage)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_either_read_or_raise_value_error_on_any_input(data: bytes) -> None:
    for parse in (parse_powermetrics_plist, parse_macmon_line):
        try:
            figures = parse(data)
        except ValueError:
            continue
        assert set(figures) == set(empty_reading())


# ---- memory pressure, CPU, rates --------------------------------------------------------


def test_macos_memory_pressure_levels() -> None:
    assert [parse_memorystatus_level(t) for t in ("1\n", "2\n", "4\n")] == [
        "normal",
        "warn",
        "critical",
    ]
    assert parse_memorystatus_level("3") is None
    assert parse_memorystatus_level("") is None
    assert parse_memorystatus_level(None) is None


def test_linux_psi_gives_memory_pressure() -> None:
    calm = (
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    assert parse_psi(calm)["some"]["avg10"] == 0.0
    assert memory_pressure_from_psi(parse_psi(calm)) == "normal"
    stalled = (
        "some avg10=23.51 avg60=9.10 avg300=2.00 total=912345\n"
        "full avg10=4.20 avg60=1.00 avg300=0.10 total=1234\n"
    )
    assert memory_pressure_from_psi(parse_psi(stalled)) == "warn"
    thrashing = (
        "some avg10=81.00 avg60=60.00 avg300=20.00 total=9\n"
        "full avg10=55.00 avg60=40.00 avg300=10.00 total=9\n"
    )
    assert memory_pressure_from_psi(parse_psi(thrashing)) == "critical"
    assert memory_pressure_from_psi(parse_psi("")) is None


def test_cpu_percent_between_two_readings() -> None:
    before = {"user": 10.0, "system": 5.0, "idle": 85.0, "iowait": 0.0, "guest": 0.0}
    after = {"user": 40.0, "system": 15.0, "idle": 135.0, "iowait": 10.0, "guest": 20.0}
    # 100 s passed (guest time is already inside user), 40 s of it busy.
    assert cpu_percent_between(before, after) == pytest.approx(40.0)
    assert cpu_percent_between(before, before) is None


def test_rates_need_a_previous_counter_and_survive_a_reset() -> None:
    assert rate(1000, 3000, 2.0) == 1000.0
    assert rate(None, 3000, 2.0) is None
    assert rate(5000, 10, 1.0) is None  # counter reset: no rate, not a negative one
    assert rate(1000, 3000, 0.0) is None


def test_merged_readings_take_each_figure_from_the_first_source_that_has_it() -> None:
    macmon = reading(gpu_utilization_percent=90.0, gpu_power_watts=60.0, gpu_temperature_c=50.0)
    powermetrics = reading(gpu_utilization_percent=88.0, thermal="nominal")
    merged = merge_readings([macmon, powermetrics])
    assert merged["gpu_utilization_percent"] == 90.0
    assert merged["gpu_temperature_c"] == 50.0
    assert merged["thermal_state"] == "nominal"
    assert merged["cpu_power_watts"] is None


# ---- streaming sources, through real processes ------------------------------------------


@pytest.fixture
def macmon_pipe(tmp_path: Path) -> Path:
    """The recorded samples, one line each, as `macmon pipe` prints them; M1 Max last."""
    path = tmp_path / "macmon.jsonl"
    path.write_text("".join(macmon_lines(n)[0] + "\n" for n in (BESZEL, ISSUE_26, M1_MAX)))
    return path


def test_macmon_source_streams_the_latest_line(macmon_pipe: Path) -> None:
    source = MacmonSource(["cat", str(macmon_pipe)])
    try:
        assert source.available()
        figures = wait_until(
            source.read, lambda r: r is not None and r["gpu_power_watts"] == 1.1298161745071411
        )
        assert figures is not None and figures["gpu_temperature_c"] == 52.1805419921875
    finally:
        source.close()


def test_powermetrics_source_splits_its_stream_on_nul_bytes(tmp_path: Path) -> None:
    stream = tmp_path / "powermetrics.bin"
    stream.write_bytes(powermetrics_stream())
    source = PowermetricsSource(["cat", str(stream)])
    try:
        assert source.available()
        figures = wait_until(
            source.read, lambda r: r is not None and r["gpu_power_watts"] == pytest.approx(0.269614)
        )
        assert figures is not None
        assert figures["thermal_state"] == "nominal"
        assert figures["gpu_utilization_percent"] == pytest.approx(12.2657)
        assert figures["cpu_power_watts"] == pytest.approx(2.97845)
    finally:
        source.close()


def test_a_stream_skips_garbage_lines_and_keeps_reading() -> None:
    (good,) = macmon_lines(ISSUE_26)
    script = f"print('macmon: warming up'); print({good!r}, flush=True)"
    source = MacmonSource([sys.executable, "-c", script])
    try:
        figures = wait_until(source.read, lambda r: r is not None)
        assert figures is not None and figures["gpu_power_watts"] == 0.017451683
    finally:
        source.close()


def test_a_failing_source_command_yields_none_never_an_exception() -> None:
    missing = PowermetricsSource(["/nonexistent/powermetrics"])
    assert missing.available() is False
    assert missing.read() is None
    missing.close()

    crashing = MacmonSource(["false"])
    assert crashing.available()
    assert crashing.read() is None
    crashing.close()
    assert crashing.read() is None


def test_closing_a_source_stops_its_process() -> None:
    source = MacmonSource([sys.executable, "-c", "import time; time.sleep(60)"])
    assert source.read() is None
    children = wait_until(psutil.Process().children, lambda c: len(c) > 0)
    source.close()
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


@linux_without_gpu
def test_no_gpu_source_is_available_on_this_linux_machine() -> None:
    assert NvmlSource().available() is False  # pynvml is not installed here
    assert NvmlSource().read() is None
    assert PowermetricsSource().available() is False
    assert MacmonSource().available() is False
    assert [s.available() for s in default_sources()] == [False]


# ---- the sampler ------------------------------------------------------------------------


def burn_cpu(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@linux_without_gpu
def test_sampler_gives_real_figures_here_and_none_for_gpu_figures() -> None:
    with Sampler() as sampler:
        assert sampler.source_names == ()
        first = sampler.sample()
        burn_cpu(0.2)
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname()) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(b"x" * 200_000)
                    received = 0
                    while received < 200_000:
                        received += len(peer.recv(65536))
        second = sampler.sample()

    memory = psutil.virtual_memory()
    assert isinstance(second, NodeSample)
    assert second.memory_total_bytes == memory.total
    assert 0 < second.memory_available_bytes <= second.memory_total_bytes
    assert 0 < second.memory_used_bytes <= second.memory_total_bytes
    assert second.memory_available_bytes == pytest.approx(memory.available, rel=0.1)
    assert second.swap_used_bytes == psutil.swap_memory().used
    assert second.memory_pressure in MEMORY_PRESSURE_LEVELS  # this kernel has PSI
    assert second.cpu_percent is not None and 0 < second.cpu_percent <= 100
    assert second.timestamp == pytest.approx(time.time(), abs=5)

    assert second.gpu_utilization_percent is None
    assert second.gpu_power_watts is None
    assert second.gpu_temperature_c is None
    assert second.cpu_power_watts is None
    assert second.thermal_state is None
    assert second.power_sources == ()

    lo_first = {i.name: i for i in first.interfaces}["lo"]
    lo = {i.name: i for i in second.interfaces}["lo"]
    assert lo_first.recv_bytes_per_s is None  # no rate before there is a previous counter
    assert lo.bytes_recv - lo_first.bytes_recv >= 200_000
    assert lo.recv_bytes_per_s is not None and lo.recv_bytes_per_s > 0


def test_sampler_reads_linux_memory_pressure_from_psi(tmp_path: Path) -> None:
    psi = tmp_path / "memory"
    psi.write_text("some avg10=90.00 total=1\nfull avg10=70.00 total=1\n")
    with Sampler(sources=[], system="Linux", psi_path=psi) as sampler:
        assert sampler.sample().memory_pressure == "critical"
    with Sampler(sources=[], system="Linux", psi_path=tmp_path / "absent") as sampler:
        assert sampler.sample().memory_pressure is None


def test_sampler_reads_macos_memory_pressure_through_sysctl() -> None:
    calls: list[tuple[str, ...]] = []

    def warn(argv: Sequence[str]) -> str | None:
        calls.append(tuple(argv))
        return "2\n"

    with Sampler(sources=[], system="Darwin", runner=warn) as sampler:
        assert sampler.sample().memory_pressure == "warn"
    assert calls == [("sysctl", "-n", "kern.memorystatus_vm_pressure_level")]

    with Sampler(sources=[], system="Darwin", runner=lambda argv: None) as sampler:
        assert sampler.sample().memory_pressure is None


def test_sampler_merges_its_sources_and_names_the_ones_that_answered() -> None:
    macmon = FixedSource("macmon", reading(gpu_utilization_percent=90.0, gpu_temperature_c=50.0))
    powermetrics = FixedSource("powermetrics", reading(gpu_power_watts=40.0, thermal="fair"))
    silent = FixedSource("silent", None)
    absent = FixedSource("absent", reading(gpu_power_watts=999.0), available=False)
    with Sampler(sources=[macmon, silent, powermetrics, absent]) as sampler:
        assert sampler.source_names == ("macmon", "silent", "powermetrics")
        sample = sampler.sample()
    assert sample.gpu_utilization_percent == 90.0
    assert sample.gpu_temperature_c == 50.0
    assert sample.gpu_power_watts == 40.0
    assert sample.thermal_state == "fair"
    assert sample.cpu_power_watts is None
    assert sample.power_sources == ("macmon", "powermetrics")
    assert macmon.closed and powermetrics.closed and silent.closed


def test_sampler_with_a_streaming_macmon_source_end_to_end(macmon_pipe: Path) -> None:
    source = MacmonSource(["cat", str(macmon_pipe)])
    with Sampler(sources=[source]) as sampler:
        sample = wait_until(sampler.sample, lambda s: s.gpu_power_watts == 1.1298161745071411)
    assert sample.power_sources == ("macmon",)
    assert sample.gpu_temperature_c == 52.1805419921875
    assert sample.thermal_state is None
