"""GPU utilization, power, temperature and thermal state, from whatever this OS offers.

macOS: `powermetrics` (root, or sudo without a password for it) and `macmon` (no root,
when installed). CUDA machines: NVML through pynvml, when installed. Each source says
whether it is `available()`; a figure it does not provide is None, never invented.

powermetrics and macmon sample over an interval (a second), so starting one per sample
would cost that second each time: each runs once, streaming, and the latest record it
printed is what `read()` returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import plistlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypedDict, TypeVar
from xml.parsers.expat import ExpatError

from pomona.worker.hardware import CommandRunner, SubprocessRunner

logger = logging.getLogger(__name__)

THERMAL_STATES = ("nominal", "fair", "serious", "critical")
# powermetrics' thermal pressure names -> the four ProcessInfo.ThermalState names.
_THERMAL_PRESSURE = {
    "nominal": "nominal",
    "light": "fair",
    "moderate": "fair",
    "heavy": "serious",
    "trapping": "critical",
    "sleeping": "critical",
    "critical": "critical",
}

# A working GPU is never this cold: macmon prints 0.0 (or a stray value near or below
# zero) when it found no sensor.
MIN_REAL_GPU_CELSIUS = 5.0

_SAMPLERS = "gpu_power,cpu_power,thermal"
POWERMETRICS_ARGV = ("powermetrics", "--samplers", _SAMPLERS, "-i", "1000", "-f", "plist")
MACMON_ARGV = ("macmon", "pipe", "-i", "1000")

_T = TypeVar("_T")


class PowerReading(TypedDict):
    """What a source read; None for what it does not provide."""

    gpu_utilization_percent: float | None
    gpu_power_watts: float | None
    gpu_temperature_c: float | None
    cpu_power_watts: float | None
    thermal_state: str | None  # one of THERMAL_STATES


# ---- pure parsers -------------------------------------------------------------------


def empty_reading() -> PowerReading:
    return PowerReading(
        gpu_utilization_percent=None,
        gpu_power_watts=None,
        gpu_temperature_c=None,
        cpu_power_watts=None,
        thermal_state=None,
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _percent(ratio: float) -> float:
    return max(0.0, min(100.0, ratio * 100.0))


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def thermal_state(pressure: str | None) -> str | None:
    """powermetrics' thermal pressure ("Nominal", "Heavy", ...) -> a THERMAL_STATES name."""
    return _THERMAL_PRESSURE.get(pressure.strip().lower()) if pressure else None


def parse_powermetrics_plist(data: bytes) -> PowerReading:
    """One `powermetrics -f plist` record (gpu_power, cpu_power, thermal samplers).

    Power comes from `processor.{gpu,cpu}_power` (mW); releases that give only energy
    (`gpu.gpu_energy` or `processor.{gpu,cpu}_energy`, mJ over `elapsed_ns`) are read
    from that.
    Raises ValueError when `data` is not a powermetrics record.
    """
    try:
        doc = plistlib.loads(data.strip(b"\x00 \t\r\n"))
    except (plistlib.InvalidFileException, ExpatError, ValueError) as e:
        raise ValueError(f"not a powermetrics plist: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError("not a powermetrics plist: its top level is not a dict")
    processor, gpu = _dict(doc.get("processor")), _dict(doc.get("gpu"))
    elapsed_ns = _number(doc.get("elapsed_ns"))
    elapsed_s = elapsed_ns / 1e9 if elapsed_ns else None

    def watts(power_mw: object, *energy_mj: object) -> float | None:
        mw = _number(power_mw)
        if mw is not None:
            return mw / 1000.0
        mj = _first(_number(e) for e in energy_mj)
        return mj / 1000.0 / elapsed_s if mj is not None and elapsed_s else None

    idle = _number(gpu.get("idle_ratio"))
    pressure = doc.get("thermal_pressure")
    return PowerReading(
        gpu_utilization_percent=_percent(1.0 - idle) if idle is not None else None,
        gpu_power_watts=watts(
            processor.get("gpu_power"), gpu.get("gpu_energy"), processor.get("gpu_energy")
        ),
        gpu_temperature_c=None,  # powermetrics has no temperatures on Apple silicon
        cpu_power_watts=watts(processor.get("cpu_power"), processor.get("cpu_energy")),
        thermal_state=thermal_state(pressure if isinstance(pressure, str) else None),
    )


def parse_macmon_line(line: str | bytes) -> PowerReading:
    """One JSON line of `macmon pipe`. Raises ValueError when it is not one.

    The busy ratio is `gpu_active_ratio` (the GPU's active residency, macmon 0.8+)
    where present; `gpu_usage` = [MHz, ratio] is read only from older releases, where
    it is the only figure (since 0.8 it is a deprecated, frequency-scaled alias).
    Powers are in W. A GPU temperature at or below `MIN_REAL_GPU_CELSIUS` is macmon
    finding no sensor (it prints 0.0), not a reading.
    """
    doc = json.loads(line)  # JSONDecodeError is a ValueError
    if not isinstance(doc, dict):
        raise ValueError("not a macmon sample: its top level is not an object")
    busy = _number(doc.get("gpu_active_ratio"))
    usage = doc.get("gpu_usage")
    if busy is None and isinstance(usage, list) and len(usage) == 2:
        busy = _number(usage[1])
    celsius = _number(_dict(doc.get("temp")).get("gpu_temp_avg"))
    return PowerReading(
        gpu_utilization_percent=_percent(busy) if busy is not None else None,
        gpu_power_watts=_number(doc.get("gpu_power")),
        gpu_temperature_c=celsius
        if celsius is not None and celsius > MIN_REAL_GPU_CELSIUS
        else None,
        cpu_power_watts=_number(doc.get("cpu_power")),
        thermal_state=None,  # macmon does not report thermal pressure
    )


def _first(values: Iterable[_T | None]) -> _T | None:
    return next((value for value in values if value is not None), None)


def merge_readings(readings: Sequence[PowerReading]) -> PowerReading:
    """Each figure from the first reading that has it."""
    return PowerReading(
        gpu_utilization_percent=_first(r["gpu_utilization_percent"] for r in readings),
        gpu_power_watts=_first(r["gpu_power_watts"] for r in readings),
        gpu_temperature_c=_first(r["gpu_temperature_c"] for r in readings),
        cpu_power_watts=_first(r["cpu_power_watts"] for r in readings),
        thermal_state=_first(r["thermal_state"] for r in readings),
    )


# ---- sources (I/O) -------------------------------------------------------------------


class PowerSource(Protocol):
    name: str

    def available(self) -> bool: ...

    def read(self) -> PowerReading | None: ...

    def close(self) -> None: ...


class RecordStream:
    """Runs one sampling command for as long as it is needed; keeps its latest record.

    `latest()` starts the command on first use, and again `restart_after_s` after it
    last started if it has exited. A record older than `max_age_s` is not returned.
    """

    def __init__(
        self,
        argv: Sequence[str],
        separator: bytes,
        parse: Callable[[bytes], PowerReading],
        *,
        max_age_s: float = 5.0,
        restart_after_s: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self._separator = separator
        self._parse = parse
        self._max_age_s = max_age_s
        self._restart_after_s = restart_after_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None
        self._latest: tuple[float, PowerReading] | None = None
        self._closed = False

    def latest(self) -> PowerReading | None:
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return None
            running = self._proc is not None and self._proc.poll() is None
            due = self._started_at is None or now - self._started_at >= self._restart_after_s
            if not running and due:
                self._start(now)
            latest = self._latest
        if latest is None or now - latest[0] > self._max_age_s:
            return None
        return latest[1]

    def _start(self, now: float) -> None:
        self._started_at = now
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError as e:
            logger.info("cannot start %s: %s", self.argv[0], e)
            self._proc = None
            return
        self._proc = proc
        self._thread = threading.Thread(
            target=self._pump, args=(proc,), name=f"pomona-{self.argv[0]}", daemon=True
        )
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        buffer = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            *records, buffer = (buffer + chunk).split(self._separator)
            for record in records:
                self._accept(record)
        self._accept(buffer)
        proc.stdout.close()
        logger.debug("%s exited with %s", self.argv[0], proc.wait())

    def _accept(self, record: bytes) -> None:
        if not record.strip(b"\x00 \t\r\n"):
            return
        try:
            reading = self._parse(record)
        except ValueError as e:
            logger.debug("unreadable record from %s: %s", self.argv[0], e)
            return
        with self._lock:
            self._latest = (time.monotonic(), reading)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc, thread = self._proc, self._thread
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if thread is not None:
            thread.join(timeout=2.0)


class PowermetricsSource:
    """`powermetrics` (macOS): GPU busy %, GPU and CPU power, thermal pressure.

    It needs root: the daemon runs it directly as root, or through `sudo -n` where
    sudoers lets this user run powermetrics without a password.
    """

    name = "powermetrics"

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        *,
        runner: CommandRunner | None = None,
        system: str | None = None,
    ) -> None:
        self._argv = list(argv) if argv is not None else None
        self._run: CommandRunner = runner if runner is not None else SubprocessRunner()
        self._system = system if system is not None else platform.system()
        self._stream: RecordStream | None = None

    def _resolve_argv(self) -> list[str] | None:
        if self._argv is not None:
            return self._argv if shutil.which(self._argv[0]) else None
        path = shutil.which(POWERMETRICS_ARGV[0])
        if self._system != "Darwin" or path is None:
            return None
        if os.geteuid() == 0:
            return [path, *POWERMETRICS_ARGV[1:]]
        if self._run(["sudo", "-n", "-l", path]) is not None:
            return ["sudo", "-n", path, *POWERMETRICS_ARGV[1:]]
        return None

    def available(self) -> bool:
        if self._stream is None:
            argv = self._resolve_argv()
            if argv is None:
                return False
            self._stream = RecordStream(argv, b"\x00", parse_powermetrics_plist)
        return True

    def read(self) -> PowerReading | None:
        return self._stream.latest() if self._stream is not None else None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


class MacmonSource:
    """`macmon pipe` (macOS, no root): GPU busy %, GPU and CPU power, GPU temperature."""

    name = "macmon"

    def __init__(self, argv: Sequence[str] = MACMON_ARGV) -> None:
        self._stream = RecordStream(argv, b"\n", parse_macmon_line)

    def available(self) -> bool:
        return shutil.which(self._stream.argv[0]) is not None

    def read(self) -> PowerReading | None:
        return self._stream.latest()

    def close(self) -> None:
        self._stream.close()


class NvmlSource:
    """NVML (CUDA machines, when pynvml is installed): mean GPU busy %, summed power,
    hottest GPU temperature."""

    name = "nvml"

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []

    def available(self) -> bool:
        if self._nvml is not None:
            return True
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as e:
            logger.info("NVML unavailable: %s", e)
            return False
        self._nvml = pynvml
        return bool(self._handles)

    def _each(self, query: Callable[[Any], float]) -> list[float]:
        values = []
        for handle in self._handles:
            try:
                values.append(float(query(handle)))
            except self._nvml.NVMLError as e:
                logger.debug("NVML query failed: %s", e)
        return values

    def read(self) -> PowerReading | None:
        if self._nvml is None:
            return None
        nvml = self._nvml
        busy = self._each(lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        power_mw = self._each(nvml.nvmlDeviceGetPowerUsage)
        temps = self._each(lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        complete = len(self._handles)
        return PowerReading(
            gpu_utilization_percent=sum(busy) / len(busy) if len(busy) == complete else None,
            gpu_power_watts=sum(power_mw) / 1000.0 if len(power_mw) == complete else None,
            gpu_temperature_c=max(temps) if temps else None,
            cpu_power_watts=None,
            thermal_state=None,
        )

    def close(self) -> None:
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as e:
                logger.debug("NVML shutdown failed: %s", e)


def default_sources(
    system: str | None = None, runner: CommandRunner | None = None
) -> list[PowerSource]:
    """The sources worth trying here, most informative first (not yet checked)."""
    if (system if system is not None else platform.system()) == "Darwin":
        return [MacmonSource(), PowermetricsSource(runner=runner, system="Darwin")]
    return [NvmlSource()]
