"""What this machine offers the MLX backends beyond TCP: RDMA over Thunderbolt, CUDA.

The coordinator picks JACCL only where every pair of ranks it needs has a working RDMA
device, so each worker reports, as ``mlx.distributed_config`` reads them over ssh but
locally: `rdma_ctl status`, the devices `ibv_devices` lists (a Thunderbolt 4 Mac says
"enabled" and lists none), and its Thunderbolt ports with the domain UUID at the other
end of each cable (`system_profiler SPThunderboltDataType -json`, ports named by
`networksetup -listallhardwareports`). macOS-only: elsewhere the RDMA facts are empty
("n/a"). Commands go through a `CommandRunner`, so tests feed recorded outputs.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass

from pomona.v1 import worker_pb2
from pomona.worker.hardware import CommandRunner, SubprocessRunner
from pomona.worker.hardware_parsers import parse_networksetup_ports

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThunderboltPort:
    interface: str  # "en2": its RDMA device is "rdma_en2"
    domain_uuid: str
    peer_domain_uuid: str  # "" when nothing is cabled to it


@dataclass(frozen=True)
class BackendFacts:
    rdma_status: str | None  # "enabled", "disabled"; None: no rdma_ctl here (n/a)
    rdma_devices: tuple[str, ...]
    thunderbolt_ports: tuple[ThunderboltPort, ...]
    cuda: bool


def parse_rdma_status(text: str | None) -> str | None:
    """`rdma_ctl status` -> "enabled"/"disabled" (its one word), None without output."""
    word = text.strip().lower() if text else ""
    return word or None


def parse_ibv_devices(text: str | None) -> tuple[str, ...]:
    """`ibv_devices` -> the device names, kept as mlx.distributed_config keeps them:
    every word that starts with "rdma_" (the header and GUIDs do not)."""
    return tuple(w for w in (text or "").split() if w.startswith("rdma_"))


def parse_thunderbolt_ports(
    sp_json: str | None, hardware_ports: str | None
) -> tuple[ThunderboltPort, ...]:
    """Thunderbolt ports with what is cabled to them, read as ``extract_connectivity``
    of mlx.distributed_config reads them: a bus with a ``domain_uuid_key`` is a port of
    this Mac; its receptacle tag N names the interface of hardware port "Thunderbolt N";
    the first item under it with a ``domain_uuid_key`` is the Mac at the other end."""
    if not sp_json or not hardware_ports:
        return ()
    try:
        buses = json.loads(sp_json).get("SPThunderboltDataType", [])
    except (ValueError, AttributeError):
        return ()
    device_of = {port: device for device, port in parse_networksetup_ports(hardware_ports).items()}
    ports = []
    for bus in buses:
        uuid = bus.get("domain_uuid_key") if isinstance(bus, dict) else None
        if not uuid:
            continue
        tag = (bus.get("receptacle_1_tag") or {}).get("receptacle_id_key")
        interface = device_of.get(f"Thunderbolt {tag}")
        if interface is None:
            continue
        peers = [i["domain_uuid_key"] for i in bus.get("_items", []) if "domain_uuid_key" in i]
        ports.append(ThunderboltPort(interface, uuid, peers[0] if peers else ""))
    return tuple(sorted(ports, key=lambda p: p.interface))


def interface_peers(facts: BackendFacts) -> dict[str, str]:
    """Each Thunderbolt port's interface -> the domain UUID of the Mac cabled to it
    ("" when nothing is): what `Describe` shows on that interface."""
    return {p.interface: p.peer_domain_uuid for p in facts.thunderbolt_ports}


def _cuda() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return bool(mx.cuda.is_available())


def read_backend_facts(run: CommandRunner | None = None, system: str | None = None) -> BackendFacts:
    """This machine's facts (slow on macOS: system_profiler; read once per daemon)."""
    run = run or SubprocessRunner(timeout_s=10.0)
    if (system or platform.system()) != "Darwin":
        return BackendFacts(None, (), (), _cuda())
    return BackendFacts(
        rdma_status=parse_rdma_status(run(["rdma_ctl", "status"])),
        rdma_devices=parse_ibv_devices(run(["ibv_devices"])),
        thunderbolt_ports=parse_thunderbolt_ports(
            run(["system_profiler", "SPThunderboltDataType", "-json"]),
            run(["networksetup", "-listallhardwareports"]),
        ),
        cuda=False,
    )


def facts_to_proto(facts: BackendFacts) -> worker_pb2.BackendFacts:
    return worker_pb2.BackendFacts(
        rdma_status=facts.rdma_status or "",
        rdma_devices=list(facts.rdma_devices),
        thunderbolt_ports=[
            worker_pb2.ThunderboltPort(
                interface=p.interface,
                domain_uuid=p.domain_uuid,
                peer_domain_uuid=p.peer_domain_uuid,
            )
            for p in facts.thunderbolt_ports
        ],
        cuda=facts.cuda,
    )
