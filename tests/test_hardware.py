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
from macos_recordings import recorded, recordings, sysctl_lines

from pomona.chips import chip_bandwidth_gbs, lookup_chip
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
    read_hardware,
)
from pomona.worker.hardware_parsers import (
    CoreTier,
    parse_cpuinfo_model_name,
    parse_int,
    parse_ioreg_gpu_cores,
    parse_networksetup_ports,
    parse_perf_levels,
    parse_rdma_ctl_status,
    parse_sw_vers,
    parse_sysctl,
    parse_system_profiler_gpu_cores,
    port_kind,
    split_core_tiers,
)

GiB = 1024**3

SW_VERS = "sw_vers__tirekick_github-runner-macos26_about.txt"
SYSTEM_PROFILER = (
    "system_profiler_SPDisplaysDataType__tirekick-via-osquery7486_M1Pro_3displays.json"
)
IOREG = "ioreg_AGXAccelerator__headstate_M2Max_trimmed.txt"
RDMA_ENABLED = "rdma_ctl_status__omlx-issue-3037_TB4_enabled.txt"
MAC_STUDIO_PORTS = (
    "networksetup_listallhardwareports__knurlogic_Mac15-14_M3Ultra_MacStudio_trimmed.txt"
)
LAPTOP_PORTS = (
    "networksetup_listallhardwareports__alfred-network-workflow-20_MBP14-2021_macOS12.1_excerpt.txt"
)


class RecordedMac:
    """A `CommandRunner` answering each command from a recording; counts calls.

    No one Mac was recorded whole, so each command answers from its own recording
    (see RECORDINGS.md); `sysctl -n` answers from `sysctl_file`, by default the
    hand-written M2 Ultra file, the only one with every name the reader asks for.
    """

    def __init__(self, sysctl_file: str = "sysctl_m2_ultra.txt", **sysctl_overrides: str) -> None:
        self.sysctl = parse_sysctl(sysctl_lines(sysctl_file))
        self.sysctl.update({k.replace("__", "."): v for k, v in sysctl_overrides.items()})
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str | None:
        argv = tuple(argv)
        self.calls.append(argv)
        if argv[:2] == ("sysctl", "-n"):
            value = self.sysctl.get(argv[2])
            return None if value is None else value + "\n"
        outputs = {
            ("sw_vers",): SW_VERS,
            ("system_profiler", "SPDisplaysDataType", "-json"): SYSTEM_PROFILER,
            ("ioreg", "-r", "-c", "AGXAccelerator", "-d", "1"): IOREG,
            ("rdma_ctl", "status"): RDMA_ENABLED,
            ("networksetup", "-listallhardwareports"): MAC_STUDIO_PORTS,
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
    assert parse_sw_vers(recorded(SW_VERS)) == "macOS 26.6.2"
    assert parse_sw_vers("") is None


# Every recorded sysctl output: (chip, machine model, CPU tiers, (performance,
# efficiency) cores, wired limit in MB) as the recording shows them; None where absent.
SYSCTL_RECORDINGS = {
    "sysctl_perflevels__tirekick-via-macmon47_Mac17-6_M5Max.txt": (
        None,
        None,
        (CoreTier("Super", 6), CoreTier("Performance", 12)),
        (18, 0),
        None,
    ),
    "sysctl__tirekick_github-runner-macos26_VirtualMac2-1.txt": (
        "Apple M1 (Virtual)",
        "VirtualMac2,1",
        (CoreTier("Standard", 3),),
        (3, 0),
        None,
    ),
    "sysctl_a_hw__cpufetch-issue-139_M1Pro_excerpt.txt": (
        None,
        None,
        (CoreTier("Performance", 8), CoreTier("Efficiency", 2)),
        (8, 2),
        None,
    ),
    "sysctl_iogpu_wired_limit__validation-log_Mac14-12_M2Pro_macOS26.5.1.txt": (
        None,
        "Mac14,12",
        (),
        (None, None),
        0,
    ),
    "sysctl_machdep_cpu__archspec-issue-38_M1_macOS11-early.txt": (
        "Apple processor",
        None,
        (),
        (None, None),
        None,
    ),
    "sysctl_machdep_cpu__sysinfo-pr-497_M1.txt": ("Apple M1", None, (), (None, None), None),
    "sysctl_m2_ultra.txt": (
        "Apple M2 Ultra",
        "Mac14,14",
        (CoreTier("Performance", 16), CoreTier("Efficiency", 8)),
        (16, 8),
        0,
    ),
}


def test_every_sysctl_recording_is_in_the_table() -> None:
    assert set(recordings("sysctl")) == set(SYSCTL_RECORDINGS)


@pytest.mark.parametrize("name", sorted(SYSCTL_RECORDINGS))
def test_each_recorded_sysctl_output_is_read_as_the_mac_printed_it(name: str) -> None:
    chip, model, tiers, (performance, efficiency), wired_mb = SYSCTL_RECORDINGS[name]
    values = parse_sysctl(sysctl_lines(name))
    assert parse_perf_levels(values) == tiers
    assert parse_int(values.get("iogpu.wired_limit_mb")) == wired_mb

    info = HardwareReader(RecordedMac(name), system="Darwin").read()
    assert info.chip == chip
    assert info.machine_model == model
    assert info.core_tiers == tiers
    assert (info.performance_cores, info.efficiency_cores) == (performance, efficiency)
    # A wired limit of 0 is "the system default", never "no GPU memory".
    if wired_mb == 0:
        assert info.gpu_memory_limit_source == SOURCE_DEFAULT_RULE


def test_m5_max_has_no_efficiency_cores_and_a_virtual_mac_one_tier() -> None:
    m5 = parse_sysctl(recorded("sysctl_perflevels__tirekick-via-macmon47_Mac17-6_M5Max.txt"))
    assert [t.name for t in parse_perf_levels(m5)] == ["Super", "Performance"]
    assert split_core_tiers(parse_perf_levels(m5)) == (18, 0)
    # A level said to exist but unreadable gives no picture rather than half of one.
    del m5["hw.perflevel1.physicalcpu"]
    assert parse_perf_levels(m5) == ()


def test_chips_named_by_recorded_sysctl_outputs_are_known_or_said_unknown() -> None:
    assert lookup_chip("Apple M1") is not None
    assert lookup_chip("Apple processor") is None  # macOS 11.0's first M1 release
    assert lookup_chip("Apple M1 (Virtual)") is None  # a VM's memory is not the chip's


def test_m5_pro_and_max_are_known_with_only_their_published_bandwidth() -> None:
    # The recorded M5 Max reports 40 GPU cores.
    cores = parse_ioreg_gpu_cores(recorded("ioreg_gpu-core-count__stats-3047_M5Max_grep.txt"))
    assert chip_bandwidth_gbs("Apple M5 Max", cores) == 614.0
    assert chip_bandwidth_gbs("Apple M5 Pro", 20) == 307.0
    # Apple published no figure for the smaller variants: unknown, not guessed.
    assert chip_bandwidth_gbs("Apple M5 Max", 32) is None
    assert chip_bandwidth_gbs("Apple M5 Max") is None
    assert chip_bandwidth_gbs("Apple M5 Pro", 16) is None


SYSTEM_PROFILER_RECORDINGS = {SYSTEM_PROFILER: 14}


def test_gpu_cores_come_from_system_profiler_json() -> None:
    assert set(recordings("system_profiler")) == {
        *SYSTEM_PROFILER_RECORDINGS,
        "system_profiler_SPDisplaysDataType_headless.json",
    }
    for name, cores in SYSTEM_PROFILER_RECORDINGS.items():
        assert parse_system_profiler_gpu_cores(recorded(name)) == cores, name
    headless = recorded("system_profiler_SPDisplaysDataType_headless.json")  # hand-written
    assert parse_system_profiler_gpu_cores(headless) == 20
    assert parse_system_profiler_gpu_cores('{"SPDisplaysDataType": []}') is None
    assert parse_system_profiler_gpu_cores("not json") is None


IOREG_RECORDINGS = {
    IOREG: 38,
    "ioreg_gpu-core-count__stats-3047_M5Max_grep.txt": 40,
    "ioreg_IOAccelerator__stats-1094_M1Pro-MBP16_macOS12.6_excerpt.txt": None,  # cut before
    "ioreg_IOPlatformExpertDevice__unidentified-doc_masked.txt": None,  # not the GPU
}


def test_every_ioreg_recording_is_in_the_table() -> None:
    assert set(recordings("ioreg")) == set(IOREG_RECORDINGS)


@pytest.mark.parametrize("name", sorted(IOREG_RECORDINGS))
def test_gpu_cores_from_each_recorded_ioreg_output(name: str) -> None:
    assert parse_ioreg_gpu_cores(recorded(name)) == IOREG_RECORDINGS[name]


def test_gpu_cores_come_from_ioreg_when_system_profiler_fails() -> None:
    assert parse_ioreg_gpu_cores("+-o IOResources  <class IOResources>") is None

    mac = RecordedMac()

    def no_profiler(argv: Sequence[str]) -> str | None:
        return None if argv[0] == "system_profiler" else mac(argv)

    info = HardwareReader(no_profiler, system="Darwin").read()
    assert info.gpu_cores == 38


# Every recorded `networksetup -listallhardwareports`: each device's kind. Idle
# "Ethernet Adapter (enN)" ports (one per USB-C port) are not Ethernet; a USB NIC
# named after its chip (AX88179A) is.
NETWORKSETUP_RECORDINGS = {
    MAC_STUDIO_PORTS: {
        "en0": "ethernet",
        **{f"en{n}": "other" for n in range(8, 14)},
        "en1": "wifi",
        **{f"en{n}": "thunderbolt" for n in range(2, 8)},
    },
    LAPTOP_PORTS: {
        "en4": "other",
        "en5": "other",
        "en6": "other",
        "en8": "ethernet",
        "en0": "wifi",
        "en1": "thunderbolt",
        "en2": "thunderbolt",
        "en3": "thunderbolt",
        "bridge0": "thunderbolt",
    },
    # Hand-written (no recording shows a dock's NIC or a tethered iPhone).
    "networksetup_listallhardwareports_laptop_dock.txt": {
        "en0": "wifi",
        "en8": "ethernet",  # USB 10/100/1G/2.5G LAN
        "en10": "ethernet",  # "Thunderbolt Ethernet Slot 0": a dock's NIC, not a TB link
        "en4": "other",  # Ethernet Adapter (en4)
        "en9": "other",  # iPhone USB
        "bridge0": "thunderbolt",
        "en1": "thunderbolt",
    },
}


def test_every_networksetup_recording_is_in_the_table() -> None:
    assert set(recordings("networksetup")) == set(NETWORKSETUP_RECORDINGS)


@pytest.mark.parametrize("name", sorted(NETWORKSETUP_RECORDINGS))
def test_each_recorded_port_list_classifies_every_device(name: str) -> None:
    ports = parse_networksetup_ports(recorded(name))
    assert {device: port_kind(port) for device, port in ports.items()} == (
        NETWORKSETUP_RECORDINGS[name]
    )


def test_usb_nics_named_after_their_chip_are_ethernet() -> None:
    assert [port_kind(n) for n in ("AX88179A", "AX88772", "RTL8153", "RTL8156B")] == [
        "ethernet"
    ] * 4
    assert port_kind("Ethernet Adapter (en12)") == "other"
    assert port_kind("Ethernet") == "ethernet"


RDMA_RECORDINGS = {RDMA_ENABLED: True, "rdma_ctl_status_disabled.txt": False}


def test_rdma_ctl_status_is_true_only_when_enabled() -> None:
    assert set(recordings("rdma_ctl")) == set(RDMA_RECORDINGS)
    for name, enabled in RDMA_RECORDINGS.items():
        assert parse_rdma_ctl_status(recorded(name)) is enabled, name


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
    assert info.os == "macOS 26.6.2"
    assert info.machine_model == "Mac14,14"
    assert info.chip == "Apple M2 Ultra"
    assert (info.performance_cores, info.efficiency_cores) == (16, 8)
    assert info.gpu_cores == 14  # the recorded M1 Pro's system_profiler
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
        "en8": [addr(socket.AF_INET6, "fe80::1%en8")],
        "en2": [addr(socket.AF_INET, "169.254.3.7")],
        "utun0": [],
    }
    stats = {
        "lo0": stat(True, 0, "up,loopback,running"),
        "en0": stat(True, 10000, "up,broadcast,running"),
        "en8": stat(True, 0, "up,running"),
        "en2": stat(False, 0, "broadcast"),
        "utun0": stat(True, 0, "up,running"),
    }
    monkeypatch.setattr(hardware.psutil, "net_if_addrs", lambda: addrs)
    monkeypatch.setattr(hardware.psutil, "net_if_stats", lambda: stats)

    info = HardwareReader(RecordedMac(), system="Darwin").read()
    by_name = {i.name: i for i in info.interfaces}
    assert {n: i.kind for n, i in by_name.items()} == {
        "en0": "ethernet",
        "en2": "thunderbolt",
        "en8": "other",  # an idle USB-C port's "Ethernet Adapter (en8)"
        "lo0": "loopback",
        "utun0": "other",
    }
    assert by_name["en0"].addresses == ("10.0.1.20",)
    assert by_name["en0"].speed_mbps == 10000
    assert by_name["en8"].speed_mbps is None  # 0 from the OS means "not reported"
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
