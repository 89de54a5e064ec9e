"""Pure parsers of what macOS (and Linux) print about the machine.

`pomona.worker.hardware` runs the commands; these functions read their output, so
they are tested on outputs recorded on real Macs (tests/data/macos/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CoreTier:
    """One macOS CPU performance level: its name ("Performance", "Efficiency", "Super")."""

    name: str
    cores: int


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl NAME ...` output ("name: value" or "name = value" lines) -> {name: value}."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.]+)\s*[:=]\s?(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def parse_int(text: str | None) -> int | None:
    """A single integer (`sysctl -n` output), or None."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


# Before macOS named its levels (hw.perflevelN.name), level 0 was the performance cores
# and level 1 the efficiency cores on every Apple silicon chip.
UNNAMED_LEVELS = ("Performance", "Efficiency")


def parse_perf_levels(sysctl: Mapping[str, str]) -> tuple[CoreTier, ...]:
    """macOS CPU tiers from `hw.nperflevels`, `hw.perflevelN.name` and `.physicalcpu`.

    M5 Pro and M5 Max name theirs "Super" and "Performance" and have no efficiency
    tier; a virtual Mac has one "Standard" level. Without `hw.nperflevels`, the levels
    that report a core count are read.
    """
    count = parse_int(sysctl.get("hw.nperflevels"))
    levels = range(count) if count is not None else range(len(UNNAMED_LEVELS))
    tiers = []
    for level in levels:
        cores = parse_int(sysctl.get(f"hw.perflevel{level}.physicalcpu"))
        if cores is None:
            if count is None:
                break
            return ()  # a level said to exist but unreadable: no partial picture
        name = sysctl.get(f"hw.perflevel{level}.name") or (
            UNNAMED_LEVELS[level] if level < len(UNNAMED_LEVELS) else f"level {level}"
        )
        tiers.append(CoreTier(name, cores))
    return tuple(tiers)


def split_core_tiers(tiers: Sequence[CoreTier]) -> tuple[int | None, int | None]:
    """(performance cores, efficiency cores): every non-"Efficiency" tier counts as the first."""
    if not tiers:
        return None, None
    efficiency = sum(t.cores for t in tiers if t.name.lower() == "efficiency")
    return sum(t.cores for t in tiers) - efficiency, efficiency


def parse_sw_vers(text: str) -> str | None:
    """`sw_vers` output -> "macOS 15.1"."""
    fields = parse_sysctl(text)
    version = fields.get("ProductVersion")
    if not version:
        return None
    return f"{fields.get('ProductName') or 'macOS'} {version}"


def parse_cpuinfo_model_name(text: str) -> str | None:
    """The first "model name" of /proc/cpuinfo (x86 and most ARM servers)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model name") and value.strip():
            return value.strip()
    return None


def parse_system_profiler_gpu_cores(text: str) -> int | None:
    """`system_profiler SPDisplaysDataType -json` -> the Apple GPU's core count."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    entries = data.get("SPDisplaysDataType") if isinstance(data, dict) else None
    for entry in entries or []:
        if isinstance(entry, dict):
            cores = parse_int(str(entry.get("sppci_cores", "")))
            if cores and cores > 0:
                return cores
    return None


def parse_ioreg_gpu_cores(text: str) -> int | None:
    """`ioreg -r -c AGXAccelerator -d 1` -> the "gpu-core-count" property."""
    match = re.search(r'"gpu-core-count"\s*=\s*(\d+)', text)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def parse_networksetup_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {device: hardware port name}."""
    ports: dict[str, str] = {}
    port: str | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Hardware Port":
            port = value.strip()
        elif key == "Device" and port is not None:
            ports[value.strip()] = port
            port = None
    return ports


def parse_rdma_ctl_status(text: str | None) -> bool:
    """`rdma_ctl status` prints "enabled" once RDMA over Thunderbolt is on."""
    return text is not None and text.strip().lower() == "enabled"


# macOS lists one "Ethernet Adapter (enN)" per USB-C/Thunderbolt port even with nothing
# plugged in; a real USB NIC appears under its own name, often its chip's.
_PORT_PLACEHOLDER = re.compile(r"^ethernet adapter \(en\d+\)$")
_USB_NIC_CHIP = re.compile(r"^(ax88\d+\w*|rtl81\d+\w*)$")  # ASIX, Realtek USB Ethernet chips


def port_kind(port_name: str) -> str:
    """The kind of a macOS hardware port, from its name in networksetup."""
    name = port_name.strip().lower()
    if name in ("wi-fi", "airport"):
        return "wifi"
    if _PORT_PLACEHOLDER.match(name):
        return "other"
    if _USB_NIC_CHIP.match(name):
        return "ethernet"
    # "Thunderbolt Ethernet Slot 0" is a dock's wired NIC, not a Mac-to-Mac cable.
    if name.startswith("thunderbolt") and "ethernet" not in name:
        return "thunderbolt"
    if "ethernet" in name or "lan" in name or "gbe" in name:
        return "ethernet"
    return "other"
