"""What this machine is: chip, memory, GPU limit, MLX backends and network links.

The worker daemon reports these facts to the coordinator on `Describe`. macOS-only facts
(machine model, GPU cores, wired GPU limit, Thunderbolt ports, RDMA) come from commands
that go through a `CommandRunner`, so tests feed recorded outputs; on other systems they
are None (shown as "n/a"), never an invented number.
"""

from __future__ import annotations

import functools
import logging
import platform
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import psutil

from pomona.worker.hardware_parsers import (
    UNNAMED_LEVELS,
    CoreTier,
    parse_cpuinfo_model_name,
    parse_int,
    parse_ioreg_gpu_cores,
    parse_networksetup_ports,
    parse_perf_levels,
    parse_rdma_ctl_status,
    parse_sw_vers,
    parse_system_profiler_gpu_cores,
    port_kind,
    split_core_tiers,
)

logger = logging.getLogger(__name__)

DISTRIBUTED_BACKENDS = ("ring", "jaccl", "mpi", "nccl")
INTERFACE_KINDS = ("thunderbolt", "ethernet", "wifi", "loopback", "other")

# Apple's default GPU working-set limit (Metal's recommendedMaxWorkingSetSize) while
# `iogpu.wired_limit_mb` is 0: about 3/4 of RAM on Macs with more than 36 GiB, about 2/3
# on smaller ones. Used only when neither the sysctl nor Metal itself gives the figure.
_LARGE_MAC_BYTES = 36 * 1024**3
_LARGE_MAC_GPU_FRACTION = 0.75
_SMALL_MAC_GPU_FRACTION = 2 / 3

SOURCE_WIRED_LIMIT = "sysctl iogpu.wired_limit_mb"
SOURCE_METAL = "metal: recommendedMaxWorkingSetSize"
SOURCE_DEFAULT_RULE = "default rule: 3/4 of RAM above 36 GiB, 2/3 at or below"
SOURCE_CPU_BACKEND = "assumed: CPU backend uses system RAM"


class CommandRunner(Protocol):
    """Runs a command; returns its stdout, or None when it fails, is missing or times out."""

    def __call__(self, argv: Sequence[str]) -> str | None: ...


class SubprocessRunner:
    """The real `CommandRunner`: a subprocess with a short timeout."""

    def __init__(self, timeout_s: float = 3.0) -> None:
        self.timeout_s = timeout_s

    def __call__(self, argv: Sequence[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except (OSError, subprocess.SubprocessError) as e:
            logger.debug("command %s failed: %s", argv[0], e)
            return None
        if done.returncode != 0:
            logger.debug("command %s exited %d: %s", argv, done.returncode, done.stderr.strip())
            return None
        return done.stdout


@dataclass(frozen=True)
class NetworkInterface:
    name: str
    addresses: tuple[str, ...]  # IPv4 and IPv6, as psutil gives them
    is_up: bool
    speed_mbps: int | None  # None where the OS does not report a link speed
    kind: str  # one of INTERFACE_KINDS
    link_state: str = "unknown"  # "up", "down" (no carrier, or set down) or "unknown"


@dataclass(frozen=True)
class HardwareInfo:
    hostname: str
    os: str  # "macOS 15.1", "Linux 6.8.0"
    machine_model: str | None  # "Mac14,14" on macOS, None elsewhere
    chip: str | None  # "Apple M2 Ultra", or /proc/cpuinfo's model name
    cpu_cores: int
    performance_cores: int | None  # macOS: cores of every tier but "Efficiency"; else None
    efficiency_cores: int | None  # macOS: cores of the "Efficiency" tier (0 on M5 Pro/Max)
    gpu_cores: int | None
    total_memory_bytes: int
    gpu_memory_limit_bytes: int | None
    gpu_memory_limit_source: str | None  # one of the SOURCE_* strings
    mlx_version: str | None
    mlx_device: str | None  # "gpu" or "cpu": where MLX runs by default
    distributed_backends: tuple[str, ...]  # subset of DISTRIBUTED_BACKENDS
    rdma_enabled: bool
    interfaces: tuple[NetworkInterface, ...]
    core_tiers: tuple[CoreTier, ...] = ()  # macOS CPU tiers, fastest first


# ---- pure rules -------------------------------------------------------------------


def interface_kind(
    name: str,
    *,
    loopback: bool,
    hardware_port: str | None = None,
    wireless: bool = False,
    physical: bool = False,
    driver: str | None = None,
) -> str:
    """Classify an interface from what the OS says about it (see `_linux_interface_kind`)."""
    if loopback:
        return "loopback"
    if hardware_port is not None:
        return port_kind(hardware_port)
    if driver == "thunderbolt-net" or name.startswith("thunderbolt"):
        return "thunderbolt"
    if wireless:
        return "wifi"
    if physical:
        return "ethernet"
    return "other"


def default_gpu_memory_limit(total_memory_bytes: int) -> int:
    """Apple's default GPU limit while `iogpu.wired_limit_mb` is 0 (see the constants)."""
    fraction = (
        _LARGE_MAC_GPU_FRACTION
        if total_memory_bytes > _LARGE_MAC_BYTES
        else _SMALL_MAC_GPU_FRACTION
    )
    return int(total_memory_bytes * fraction)


def gpu_memory_limit(
    *,
    is_macos: bool,
    total_memory_bytes: int,
    wired_limit_mb: int | None,
    metal_working_set_bytes: int | None,
    mlx_device: str | None,
) -> tuple[int | None, str | None]:
    """The memory MLX may use for arrays, and where that figure comes from."""
    if is_macos:
        if wired_limit_mb is not None and wired_limit_mb > 0:
            return wired_limit_mb * 1024 * 1024, SOURCE_WIRED_LIMIT
        if metal_working_set_bytes:
            return metal_working_set_bytes, SOURCE_METAL
        return default_gpu_memory_limit(total_memory_bytes), SOURCE_DEFAULT_RULE
    if mlx_device == "cpu":
        return total_memory_bytes, SOURCE_CPU_BACKEND
    return None, None


# ---- probes (I/O) --------------------------------------------------------------------


@dataclass(frozen=True)
class _MlxFacts:
    version: str | None
    device: str | None
    backends: tuple[str, ...]
    metal_working_set_bytes: int | None


def _probe_mlx() -> _MlxFacts:
    try:
        import mlx.core as mx
    except ImportError:  # the daemon can describe a machine where MLX is not installed
        return _MlxFacts(None, None, (), None)
    backends = tuple(b for b in DISTRIBUTED_BACKENDS if mx.distributed.is_available(backend=b))
    device = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    working_set = None
    if mx.metal.is_available():
        value = mx.device_info().get("max_recommended_working_set_size")
        working_set = value if isinstance(value, int) else None
    return _MlxFacts(version("mlx"), device, backends, working_set)


def linux_link_state(operstate: str | None, admin_up: bool) -> str:
    """A Linux operstate as "up", "down" or "unknown" (loopback and some virtual links
    say "unknown" while carrying traffic: then the administrative state decides)."""
    state = (operstate or "").strip().lower()
    if state in ("up", "down"):
        return state
    if state in ("lowerlayerdown", "notpresent", "dormant"):
        return "down"
    if not admin_up:
        return "down"
    return "up" if state == "unknown" else "unknown"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _linux_interface_kind(name: str, loopback: bool, sys_class_net: Path) -> str:
    base = sys_class_net / name
    try:
        driver: str | None = (base / "device" / "driver").resolve(strict=True).name
    except OSError:
        driver = None
    return interface_kind(
        name,
        loopback=loopback,
        wireless=(base / "wireless").exists() or (base / "phy80211").exists(),
        physical=(base / "device").exists(),
        driver=driver,
    )


@dataclass(frozen=True)
class _StaticFacts:
    """Facts that cannot change while the daemon runs."""

    os: str
    cpu_cores: int
    chip: str | None
    mlx: _MlxFacts
    machine_model: str | None = None
    core_tiers: tuple[CoreTier, ...] = ()
    gpu_cores: int | None = None
    rdma_enabled: bool = False
    ports: Mapping[str, str] = field(default_factory=dict)


class HardwareReader:
    """Reads `HardwareInfo`, probing what cannot change while running only once."""

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        system: str | None = None,
        cpuinfo_path: Path = Path("/proc/cpuinfo"),
        sys_class_net: Path = Path("/sys/class/net"),
    ) -> None:
        self._run: CommandRunner = runner if runner is not None else SubprocessRunner()
        self._system = system if system is not None else platform.system()
        self._cpuinfo_path = cpuinfo_path
        self._sys_class_net = sys_class_net
        self._static: _StaticFacts | None = None
        self._lock = threading.Lock()

    @property
    def is_macos(self) -> bool:
        return self._system == "Darwin"

    def _sysctl(self, name: str) -> str | None:
        out = self._run(["sysctl", "-n", name])
        return out.strip() if out is not None and out.strip() else None

    def _os_name(self) -> str:
        if self.is_macos:
            out = self._run(["sw_vers"])
            return (out and parse_sw_vers(out)) or f"macOS {platform.mac_ver()[0]}".strip()
        return f"{self._system} {platform.release()}"

    def _gpu_cores(self) -> int | None:
        out = self._run(["system_profiler", "SPDisplaysDataType", "-json"])
        cores = parse_system_profiler_gpu_cores(out) if out else None
        if cores is None:
            out = self._run(["ioreg", "-r", "-c", "AGXAccelerator", "-d", "1"])
            cores = parse_ioreg_gpu_cores(out) if out else None
        return cores

    def _core_tiers(self) -> tuple[CoreTier, ...]:
        values: dict[str, str] = {}
        count = self._sysctl("hw.nperflevels")
        if count is not None:
            values["hw.nperflevels"] = count
        for level in range(parse_int(count) or len(UNNAMED_LEVELS)):
            for key in ("name", "physicalcpu"):
                value = self._sysctl(f"hw.perflevel{level}.{key}")
                if value is not None:
                    values[f"hw.perflevel{level}.{key}"] = value
        return parse_perf_levels(values)

    def _probe_static(self) -> _StaticFacts:
        logical = psutil.cpu_count(logical=True) or 1
        cpu_cores = psutil.cpu_count(logical=False) or logical
        if not self.is_macos:
            cpuinfo = _read_text(self._cpuinfo_path)
            return _StaticFacts(
                os=self._os_name(),
                cpu_cores=cpu_cores,
                chip=parse_cpuinfo_model_name(cpuinfo) if cpuinfo else None,
                mlx=_probe_mlx(),
            )
        ports = self._run(["networksetup", "-listallhardwareports"])
        return _StaticFacts(
            os=self._os_name(),
            cpu_cores=cpu_cores,
            chip=self._sysctl("machdep.cpu.brand_string"),
            mlx=_probe_mlx(),
            machine_model=self._sysctl("hw.model"),
            core_tiers=self._core_tiers(),
            gpu_cores=self._gpu_cores(),
            rdma_enabled=parse_rdma_ctl_status(self._run(["rdma_ctl", "status"])),
            ports=parse_networksetup_ports(ports) if ports else {},
        )

    def _interfaces(self, ports: Mapping[str, str]) -> tuple[NetworkInterface, ...]:
        addrs = psutil.net_if_addrs()
        stats = psutil.net_if_stats()
        families = (socket.AF_INET, socket.AF_INET6)
        result = []
        for name in sorted(set(addrs) | set(stats)):
            stat = stats.get(name)
            flags = getattr(stat, "flags", "") if stat else ""
            loopback = "loopback" in flags or name in ("lo", "lo0")
            if self.is_macos:
                kind = interface_kind(name, loopback=loopback, hardware_port=ports.get(name))
            else:
                kind = _linux_interface_kind(name, loopback, self._sys_class_net)
            result.append(
                NetworkInterface(
                    name=name,
                    addresses=tuple(a.address for a in addrs.get(name, []) if a.family in families),
                    is_up=bool(stat and stat.isup),
                    speed_mbps=stat.speed if stat and stat.speed > 0 else None,
                    kind=kind,
                    link_state=self._link_state(name, stat),
                )
            )
        return tuple(result)

    def _link_state(self, name: str, stat: Any) -> str:
        """Linux: /sys/class/net/<name>/operstate; macOS: the interface's running flag."""
        if stat is None:
            return "unknown"
        if not self.is_macos:
            return linux_link_state(_read_text(self._sys_class_net / name / "operstate"), stat.isup)
        flags = getattr(stat, "flags", "") or ""
        return "up" if stat.isup and "running" in flags.split(",") else "down"

    def read(self) -> HardwareInfo:
        with self._lock:
            if self._static is None:
                self._static = self._probe_static()
            static = self._static
        total = psutil.virtual_memory().total
        # The wired limit can be raised at run time (`sudo sysctl`), so it is read each time.
        wired_mb = parse_int(self._sysctl("iogpu.wired_limit_mb")) if self.is_macos else None
        limit, source = gpu_memory_limit(
            is_macos=self.is_macos,
            total_memory_bytes=total,
            wired_limit_mb=wired_mb,
            metal_working_set_bytes=static.mlx.metal_working_set_bytes,
            mlx_device=static.mlx.device,
        )
        performance_cores, efficiency_cores = split_core_tiers(static.core_tiers)
        return HardwareInfo(
            hostname=socket.gethostname(),
            os=static.os,
            machine_model=static.machine_model,
            chip=static.chip,
            cpu_cores=static.cpu_cores,
            performance_cores=performance_cores,
            efficiency_cores=efficiency_cores,
            core_tiers=static.core_tiers,
            gpu_cores=static.gpu_cores,
            total_memory_bytes=total,
            gpu_memory_limit_bytes=limit,
            gpu_memory_limit_source=source,
            mlx_version=static.mlx.version,
            mlx_device=static.mlx.device,
            distributed_backends=static.mlx.backends,
            rdma_enabled=static.rdma_enabled,
            interfaces=self._interfaces(static.ports),
        )


@functools.cache
def _shared_reader() -> HardwareReader:
    return HardwareReader()


def read_hardware(runner: CommandRunner | None = None) -> HardwareInfo:
    """This machine's `HardwareInfo`.

    Without a runner, one process-wide reader is used, so slow probes (system_profiler,
    MLX backends) run once; with a runner (tests), a fresh reader is used.
    """
    return HardwareReader(runner).read() if runner is not None else _shared_reader().read()
