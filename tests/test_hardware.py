"""Hardware description: macOS parsers on recorded outputs, real values on this machine."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from pomona.worker import hardware
from pomona.worker.hardware import (
    SOURCE_CPU_BACKEND,
    SOURCE_DEFAULT_RULE,
    SOURCE_METAL,
    SOURCE_WIRED_LIMIT,
    HardwareReader,
    SubprocessRunner,
    default_gpu_memory_limit,
    gpu_memory_limit,
    interface_kind,
    parse_cpuinfo_model_name,
    parse_int,
    parse_ioreg_gpu_cores,
    parse_networksetup_ports,
    parse_rdma_ctl_status,
    parse_sw_vers,
    parse_sysctl,
    parse_system_profiler_gpu_cores,
    port_kind,
    read_hardware,
)

MACOS = Path(__file__).parent / "data" / "macos"
GiB = 1024**3


def recorded(name: str) -> str:
    return (MACOS / name).read_text()


class RecordedMac:
    """A `CommandRunner` answering from the recorded M2 Ultra outputs; counts calls."""

    def __init__(self, **sysctl_overrides: str) -> None:
        self.sysctl = parse_sysctl(recorded("sysctl_m2_ultra.txt"))
        self.sysctl.update({k.replace("__", "."): v for k, v in sysctl_overrides.items()})
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str | None:
        argv = tuple(argv)
        self.calls.append(argv)
        if argv[:2] == ("sysctl", "-n"):
            value = self.sysctl.get(argv[2])
            return None if value is None else value + "\n"
        outputs = {
            ("sw_vers",): "sw_vers.txt",
            ("system_profiler", "SPDisplaysDataType", "-json"): (
                "system_profiler_SPDisplaysDataType.json"
            ),
            ("ioreg", "-r", "-c", "AGXAccelerator", "-d", "1"): "ioreg_AGXAccelerator.txt",
            ("rdma_ctl", "status"): "rdma_ctl_status_enabled.txt",
            ("networksetup", "-listallhardwareports"): "networksetup_listallhardwareports.txt",
        }
        return recorded(outputs[argv]) if argv in outputs else None

    def count(self, *prefix: str) -> int:
        return sum(1 for call in self.calls if call[: len(prefix)] == prefix)


def failing_runner(argv: Sequence[str]) -> str | None:
    return None


# ---- parsers on recorded outputs ---------------------------------------------------


def test_sysctl_output_parses_to_names_and_values() -> None:
    values = parse_sysctl(recorded("sysctl_m2_ultra.txt"))
    assert values["hw.model"] == "Mac14,14"
    assert values["machdep.cpu.brand_string"] == "Apple M2 Ultra"
    assert parse_int(values["hw.memsize"]) == 192 * GiB
    assert parse_int(values["hw.perflevel0.physicalcpu"]) == 16
    assert parse_int(values["hw.perflevel1.physicalcpu"]) == 8
    assert parse_int(values["iogpu.wired_limit_mb"]) == 0
    assert values["vm.swapusage"].startswith("total = 2048.00M")


def test_parse_int_rejects_what_is_not_one_integer() -> None:
    assert parse_int(" 42\n") == 42
    assert parse_int(None) is None
    assert parse_int("") is None
    assert parse_int("sysctl: unknown oid 'iogpu.wired_limit_mb'") is None


def test_sw_vers_gives_the_macos_version() -> None:
    assert parse_sw_vers(recorded("sw_vers.txt")) == "macOS 15.1"
    assert parse_sw_vers("") is None


def test_gpu_cores_come_from_system_profiler_json() -> None:
    display = recorded("system_profiler_SPDisplaysDataType.json")
    assert parse_system_profiler_gpu_cores(display) == 76
    headless = recorded("system_profiler_SPDisplaysDataType_headless.json")
    assert parse_system_profiler_gpu_cores(headless) == 20
    assert parse_system_profiler_gpu_cores('{"SPDisplaysDataType": []}') is None
    assert parse_system_profiler_gpu_cores("not json") is None


def test_gpu_cores_come_from_ioreg_when_system_profiler_fails() -> None:
    assert parse_ioreg_gpu_cores(recorded("ioreg_AGXAccelerator.txt")) == 76
    assert parse_ioreg_gpu_cores("+-o IOResources  <class IOResources>") is None

    mac = RecordedMac()

    def no_profiler(argv: Sequence[str]) -> str | None:
        return None if argv[0] == "system_profiler" else mac(argv)

    info = HardwareReader(no_profiler, system="Darwin").read()
    assert info.gpu_cores == 76


def test_networksetup_ports_classify_thunderbolt_ethernet_and_wifi() -> None:
    ports = parse_networksetup_ports(recorded("networksetup_listallhardwareports.txt"))
    kinds = {device: port_kind(port) for device, port in ports.items()}
    assert kinds == {
        "en0": "ethernet",
        "bridge0": "thunderbolt",
        "en1": "wifi",
        "en2": "thunderbolt",
        "en3": "thunderbolt",
        "en4": "thunderbolt",
        "en5": "thunderbolt",
        "en6": "thunderbolt",
        "en7": "thunderbolt",
    }


def test_a_docks_thunderbolt_ethernet_is_ethernet_not_a_thunderbolt_link() -> None:
    ports = parse_networksetup_ports(recorded("networksetup_listallhardwareports_laptop_dock.txt"))
    kinds = {device: port_kind(port) for device, port in ports.items()}
    assert kinds == {
        "en0": "wifi",
        "en8": "ethernet",
        "en10": "ethernet",
        "en4": "ethernet",
        "en9": "other",
        "bridge0": "thunderbolt",
        "en1": "thunderbolt",
    }


def test_rdma_ctl_status_is_true_only_when_enabled() -> None:
    assert parse_rdma_ctl_status(recorded("rdma_ctl_status_enabled.txt")) is True
    assert parse_rdma_ctl_status(recorded("rdma_ctl_status_disabled.txt")) is False
    assert parse_rdma_ctl_status(None) is False


def test_cpuinfo_model_name() -> None:
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold\n"
    assert parse_cpuinfo_model_name(text) == "Intel(R) Xeon(R) Gold"
    assert parse_cpuinfo_model_name("processor\t: 0\nCPU implementer\t: 0x41\n") is None


def test_linux_interface_kinds() -> None:
    assert interface_kind("lo", loopback=True) == "loopback"
    assert interface_kind("eth0", loopback=False, physical=True) == "ethernet"
    assert interface_kind("wlan0", loopback=False, physical=True, wireless=True) == "wifi"
    assert interface_kind("thunderbolt0", loopback=False) == "thunderbolt"
    assert interface_kind("tb0", loopback=False, physical=True, driver="thunderbolt-net") == (
        "thunderbolt"
    )
    assert interface_kind("veth1", loopback=False) == "other"


# ---- the GPU memory limit rule -------------------------------------------------------


def test_default_gpu_limit_is_three_quarters_above_36_gib_and_two_thirds_below() -> None:
    assert default_gpu_memory_limit(192 * GiB) == 144 * GiB
    assert default_gpu_memory_limit(64 * GiB) == 48 * GiB
    assert default_gpu_memory_limit(36 * GiB) == 24 * GiB
    assert default_gpu_memory_limit(24 * GiB) == 16 * GiB


def test_gpu_memory_limit_prefers_measured_figures_and_says_where_it_came_from() -> None:
    def limit(
        is_macos: bool, wired_mb: int | None, metal: int | None, device: str = "gpu"
    ) -> tuple[int | None, str | None]:
        return gpu_memory_limit(
            is_macos=is_macos,
            total_memory_bytes=192 * GiB,
            wired_limit_mb=wired_mb,
            metal_working_set_bytes=metal,
            mlx_device=device,
        )

    assert limit(True, 180000, 150 * GiB) == (180000 * 1024 * 1024, SOURCE_WIRED_LIMIT)
    assert limit(True, 0, 150 * GiB) == (150 * GiB, SOURCE_METAL)
    assert limit(True, None, None) == (144 * GiB, SOURCE_DEFAULT_RULE)
    assert limit(False, None, None, "cpu") == (192 * GiB, SOURCE_CPU_BACKEND)
    assert limit(False, None, None, "gpu") == (None, None)  # CUDA memory is not probed


# ---- reading a (recorded) Mac ---------------------------------------------------------


def test_recorded_mac_is_described_from_its_commands() -> None:
    info = HardwareReader(RecordedMac(), system="Darwin").read()
    assert info.os == "macOS 15.1"
    assert info.machine_model == "Mac14,14"
    assert info.chip == "Apple M2 Ultra"
    assert (info.performance_cores, info.efficiency_cores) == (16, 8)
    assert info.gpu_cores == 76
    assert info.rdma_enabled is True
    # Memory is psutil's (this machine's); the wired limit is 0 and MLX here has no
    # Metal, so the documented default rule applies, and says so.
    assert info.total_memory_bytes == psutil.virtual_memory().total
    assert info.gpu_memory_limit_bytes == default_gpu_memory_limit(info.total_memory_bytes)
    assert info.gpu_memory_limit_source == SOURCE_DEFAULT_RULE


def test_a_raised_wired_limit_is_read_on_every_describe() -> None:
    mac = RecordedMac()
    reader = HardwareReader(mac, system="Darwin")
    assert reader.read().gpu_memory_limit_source == SOURCE_DEFAULT_RULE
    mac.sysctl["iogpu.wired_limit_mb"] = "180000"
    info = reader.read()
    assert info.gpu_memory_limit_bytes == 180000 * 1024 * 1024
    assert info.gpu_memory_limit_source == SOURCE_WIRED_LIMIT


def test_slow_probes_run_once_however_often_describe_is_called() -> None:
    mac = RecordedMac()
    reader = HardwareReader(mac, system="Darwin")
    for _ in range(5):
        reader.read()
    assert mac.count("system_profiler") == 1
    assert mac.count("networksetup") == 1
    assert mac.count("rdma_ctl") == 1
    assert mac.count("sysctl", "-n", "iogpu.wired_limit_mb") == 5


def test_mac_interfaces_take_their_kind_from_networksetup(monkeypatch: pytest.MonkeyPatch) -> None:
    def addr(family: int, address: str) -> SimpleNamespace:
        return SimpleNamespace(family=family, address=address)

    def stat(isup: bool, speed: int, flags: str) -> SimpleNamespace:
        return SimpleNamespace(isup=isup, speed=speed, flags=flags)

    addrs = {
        "lo0": [addr(socket.AF_INET, "127.0.0.1")],
        "en0": [addr(socket.AF_INET, "10.0.1.20"), addr(psutil.AF_LINK, "3a:00:00:00:00:01")],
        "bridge0": [addr(socket.AF_INET6, "fe80::1%bridge0")],
        "en2": [addr(socket.AF_INET, "169.254.3.7")],
        "utun0": [],
    }
    stats = {
        "lo0": stat(True, 0, "up,loopback,running"),
        "en0": stat(True, 10000, "up,broadcast,running"),
        "bridge0": stat(True, 0, "up,running"),
        "en2": stat(False, 0, "broadcast"),
        "utun0": stat(True, 0, "up,running"),
    }
    monkeypatch.setattr(hardware.psutil, "net_if_addrs", lambda: addrs)
    monkeypatch.setattr(hardware.psutil, "net_if_stats", lambda: stats)

    info = HardwareReader(RecordedMac(), system="Darwin").read()
    by_name = {i.name: i for i in info.interfaces}
    assert {n: i.kind for n, i in by_name.items()} == {
        "bridge0": "thunderbolt",
        "en0": "ethernet",
        "en2": "thunderbolt",
        "lo0": "loopback",
        "utun0": "other",
    }
    assert by_name["en0"].addresses == ("10.0.1.20",)
    assert by_name["en0"].speed_mbps == 10000
    assert by_name["bridge0"].speed_mbps is None  # 0 from the OS means "not reported"
    assert by_name["en2"].is_up is False


def test_failing_commands_give_none_never_an_exception_or_a_guess() -> None:
    info = HardwareReader(failing_runner, system="Darwin").read()
    assert info.machine_model is None
    assert info.chip is None
    assert info.gpu_cores is None
    assert info.performance_cores is None
    assert info.rdma_enabled is False
    assert info.os.startswith("macOS")


def test_subprocess_runner_returns_none_for_missing_failing_and_slow_commands() -> None:
    run = SubprocessRunner(timeout_s=0.5)
    assert run(["echo", "hello"]) == "hello\n"
    assert run(["/nonexistent/rdma_ctl", "status"]) is None
    assert run(["false"]) is None
    started = time.monotonic()
    assert run(["sleep", "10"]) is None
    assert time.monotonic() - started < 5


# ---- this (Linux) machine ---------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="describes a Linux machine")
def test_this_machine_is_described_with_real_values_and_no_macos_facts() -> None:
    info = read_hardware()
    assert info.hostname == socket.gethostname()
    assert info.os.startswith("Linux ")
    assert info.total_memory_bytes == psutil.virtual_memory().total
    assert info.chip == parse_cpuinfo_model_name(Path("/proc/cpuinfo").read_text())
    assert info.cpu_cores == (psutil.cpu_count(logical=False) or psutil.cpu_count())
    assert info.machine_model is None
    assert info.gpu_cores is None
    assert info.performance_cores is None and info.efficiency_cores is None
    assert info.rdma_enabled is False
    assert info.mlx_version == version("mlx")
    assert info.mlx_device == "cpu"
    assert "ring" in info.distributed_backends
    assert info.gpu_memory_limit_bytes == info.total_memory_bytes
    assert info.gpu_memory_limit_source == SOURCE_CPU_BACKEND
    loopback = [i for i in info.interfaces if i.kind == "loopback"]
    assert loopback and "127.0.0.1" in loopback[0].addresses and loopback[0].is_up
    assert read_hardware() is not info  # a fresh description each call, from cached probes
