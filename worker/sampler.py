"""One cheap sample of this machine's health, taken about once a second.

CPU, memory, swap and network figures come from psutil on every system; memory pressure
from the kernel (macOS `kern.memorystatus_vm_pressure_level`, Linux PSI). GPU figures
and thermal state come from the optional sources of `power_sources`; a figure that no
source provides is None — shown as "n/a" — never an invented number.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from pomona.worker.hardware import CommandRunner, SubprocessRunner
from pomona.worker.power_sources import (
    THERMAL_STATES,
    MacmonSource,
    NvmlSource,
    PowermetricsSource,
    PowerReading,
    PowerSource,
    default_sources,
    empty_reading,
    merge_readings,
    parse_macmon_line,
    parse_powermetrics_plist,
)

__all__ = [
    "MEMORY_PRESSURE_LEVELS",
    "THERMAL_STATES",
    "InterfaceTraffic",
    "MacmonSource",
    "NodeSample",
    "NvmlSource",
    "PowerReading",
    "PowerSource",
    "PowermetricsSource",
    "Sampler",
    "cpu_percent_between",
    "memory_pressure_from_psi",
    "parse_macmon_line",
    "parse_memorystatus_level",
    "parse_powermetrics_plist",
    "parse_psi",
    "rate",
]

logger = logging.getLogger(__name__)

MEMORY_PRESSURE_LEVELS = ("normal", "warn", "critical")
# kern.memorystatus_vm_pressure_level: the kernel's own levels, which skip 3.
_MACOS_PRESSURE_LEVELS = {1: "normal", 2: "warn", 4: "critical"}
# Linux PSI, percent of the last 10 s in which some (or all) tasks stalled on memory:
# "warn" once some task lost a tenth of its time to memory, "critical" once all did.
_PSI_WARN_SOME_AVG10 = 10.0
_PSI_CRITICAL_FULL_AVG10 = 10.0


@dataclass(frozen=True)
class InterfaceTraffic:
    name: str
    bytes_sent: int  # counters since boot
    bytes_recv: int
    sent_bytes_per_s: float | None  # None on the first sample or after a counter reset
    recv_bytes_per_s: float | None


@dataclass(frozen=True)
class NodeSample:
    timestamp: float  # Unix time
    cpu_percent: float | None  # all CPUs since the last sample; None if no time passed
    memory_total_bytes: int
    memory_used_bytes: int
    memory_available_bytes: int
    memory_pressure: str | None  # one of MEMORY_PRESSURE_LEVELS
    swap_used_bytes: int
    gpu_utilization_percent: float | None
    gpu_power_watts: float | None
    gpu_temperature_c: float | None
    cpu_power_watts: float | None
    thermal_state: str | None  # one of THERMAL_STATES
    power_sources: tuple[str, ...]  # the sources that gave the five figures above
    interfaces: tuple[InterfaceTraffic, ...]


# ---- pure parsers -------------------------------------------------------------------


def parse_memorystatus_level(text: str | None) -> str | None:
    """`sysctl -n kern.memorystatus_vm_pressure_level` -> "normal" / "warn" / "critical"."""
    try:
        return _MACOS_PRESSURE_LEVELS.get(int(text.strip())) if text else None
    except ValueError:
        return None


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """/proc/pressure/memory -> {"some": {"avg10": 0.0, ...}, "full": {...}}."""
    result: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        kind, fields = parts[0], parts[1:]
        try:
            result[kind] = {k: float(v) for k, _, v in (f.partition("=") for f in fields)}
        except ValueError:
            continue
    return result


def memory_pressure_from_psi(psi: Mapping[str, Mapping[str, float]]) -> str | None:
    """The PSI rule above: "normal", "warn" or "critical"; None without PSI figures."""
    some = psi.get("some", {}).get("avg10")
    full = psi.get("full", {}).get("avg10")
    if some is None:
        return None
    if full is not None and full >= _PSI_CRITICAL_FULL_AVG10:
        return "critical"
    return "warn" if some >= _PSI_WARN_SOME_AVG10 else "normal"


def cpu_percent_between(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Busy share of all CPUs between two `psutil.cpu_times()._asdict()` readings."""

    def busy_and_total(times: Mapping[str, float]) -> tuple[float, float]:
        # Linux counts guest time inside user and nice already.
        total = sum(times.values()) - times.get("guest", 0.0) - times.get("guest_nice", 0.0)
        return total - times.get("idle", 0.0) - times.get("iowait", 0.0), total

    busy0, total0 = busy_and_total(before)
    busy1, total1 = busy_and_total(after)
    if total1 - total0 <= 0:
        return None
    return max(0.0, min(100.0, (busy1 - busy0) / (total1 - total0) * 100.0))


def rate(before: int | None, after: int, elapsed_s: float | None) -> float | None:
    """Per-second rate of a counter; None without a previous value or after a reset."""
    if before is None or elapsed_s is None or elapsed_s <= 0 or after < before:
        return None
    return (after - before) / elapsed_s


# ---- the sampler ---------------------------------------------------------------------


class Sampler:
    """Takes `NodeSample`s; keeps the previous counters to turn them into rates.

    Without `sources`, tries `power_sources.default_sources()` and keeps the available
    ones. Call `close()` (or use it as a context manager) to stop their processes.
    """

    def __init__(
        self,
        sources: Sequence[PowerSource] | None = None,
        *,
        runner: CommandRunner | None = None,
        system: str | None = None,
        psi_path: Path = Path("/proc/pressure/memory"),
    ) -> None:
        self._system = system if system is not None else platform.system()
        self._run: CommandRunner = runner if runner is not None else SubprocessRunner(1.0)
        self._psi_path = psi_path
        if sources is None:
            sources = default_sources(self._system, self._run)
        self._sources = [source for source in sources if source.available()]
        logger.info("power sources: %s", ", ".join(self.source_names) or "none")
        self._lock = threading.Lock()
        self._cpu_times = psutil.cpu_times()._asdict()
        self._net: dict[str, tuple[int, int]] = {}
        self._net_at: float | None = None

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self._sources)

    def sample(self) -> NodeSample:
        with self._lock:
            cpu_times = psutil.cpu_times()._asdict()
            cpu_percent = cpu_percent_between(self._cpu_times, cpu_times)
            self._cpu_times = cpu_times
            interfaces = self._interfaces()
        memory = psutil.virtual_memory()
        power, names = self._power()
        return NodeSample(
            timestamp=time.time(),
            cpu_percent=cpu_percent,
            memory_total_bytes=memory.total,
            memory_used_bytes=memory.used,
            memory_available_bytes=memory.available,
            memory_pressure=self._memory_pressure(),
            swap_used_bytes=psutil.swap_memory().used,
            gpu_utilization_percent=power["gpu_utilization_percent"],
            gpu_power_watts=power["gpu_power_watts"],
            gpu_temperature_c=power["gpu_temperature_c"],
            cpu_power_watts=power["cpu_power_watts"],
            thermal_state=power["thermal_state"],
            power_sources=names,
            interfaces=interfaces,
        )

    def _power(self) -> tuple[PowerReading, tuple[str, ...]]:
        readings: list[PowerReading] = []
        names: list[str] = []
        for source in self._sources:
            reading = source.read()
            if reading is not None and any(v is not None for v in reading.values()):
                readings.append(reading)
                names.append(source.name)
        return (merge_readings(readings) if readings else empty_reading()), tuple(names)

    def _memory_pressure(self) -> str | None:
        if self._system == "Darwin":
            return parse_memorystatus_level(
                self._run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"])
            )
        try:
            text = self._psi_path.read_text()
        except OSError:
            return None  # no PSI: kernel without CONFIG_PSI, or not Linux
        return memory_pressure_from_psi(parse_psi(text))

    def _interfaces(self) -> tuple[InterfaceTraffic, ...]:
        now = time.monotonic()
        elapsed = now - self._net_at if self._net_at is not None else None
        counters = psutil.net_io_counters(pernic=True)
        result = []
        for name, counter in sorted(counters.items()):
            sent_before, recv_before = self._net.get(name, (None, None))
            result.append(
                InterfaceTraffic(
                    name=name,
                    bytes_sent=counter.bytes_sent,
                    bytes_recv=counter.bytes_recv,
                    sent_bytes_per_s=rate(sent_before, counter.bytes_sent, elapsed),
                    recv_bytes_per_s=rate(recv_before, counter.bytes_recv, elapsed),
                )
            )
        self._net = {t.name: (t.bytes_sent, t.bytes_recv) for t in result}
        self._net_at = now
        return tuple(result)

    def close(self) -> None:
        for source in self._sources:
            source.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
