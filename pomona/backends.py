"""What each rank of an MLX group needs to join it, per distributed backend.

Pure: given every rank's ring addresses and, for JACCL, its RDMA devices towards each
peer, the environment variables and file contents each rank's runner gets. They follow
MLX's own launcher (``mlx.launch``: ``mlx/_distributed_utils/launch.py``), which builds
them per rank as ``launch_ring``, ``launch_jaccl`` and ``launch_nccl`` do; the tests
compare the two. The daemon writes each file and points its variable at it, as
``mlx.launch`` does with ``mktemp``.

Pomona's rank 0 ring address doubles as the JACCL coordinator and the NCCL host: no
runner listens on it for the ring while another backend is in use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

# What `mx.distributed.init(backend=...)` accepts for a group Pomona forms.
BACKENDS = ("ring", "jaccl", "jaccl-ring", "nccl")
CHOICES = ("auto", *BACKENDS)

# A rank's RDMA device towards one peer: none, one, or several (several cables).
Devices = str | tuple[str, ...] | None


@dataclass(frozen=True)
class RankHost:
    """One rank: its ring listener ("ip:port", one per address) and RDMA devices by peer."""

    ring_addresses: tuple[str, ...]
    # One entry per rank of the group (None towards itself and peers without a device).
    rdma: tuple[Devices, ...] = ()


@dataclass(frozen=True)
class RankLaunch:
    """What one rank's runner gets: variables, and files as ``{variable: content}``."""

    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def mlx_backend(backend: str) -> str:
    """The name ``mx.distributed.init`` takes: jaccl-ring is JACCL told to use a ring."""
    return "jaccl" if backend == "jaccl-ring" else backend


def needed_pairs(backend: str, size: int) -> list[tuple[int, int]]:
    """Rank pairs (i, j) that need an RDMA device from i to j: all for a mesh, neighbours
    for a ring (as ``launch_jaccl`` checks)."""
    if backend == "jaccl-ring":
        return [(i, j) for i in range(size) for j in {(i - 1) % size, (i + 1) % size} if i != j]
    return [(i, j) for i in range(size) for j in range(size) if i != j]


def missing_rdma(backend: str, hosts: Sequence[RankHost]) -> list[tuple[int, int]]:
    """The needed pairs (sorted) with no RDMA device listed: JACCL cannot form over them."""
    n = len(hosts)
    return sorted(
        (i, j)
        for i, j in needed_pairs(backend, n)
        if len(hosts[i].rdma) != n or not hosts[i].rdma[j]
    )


def device_matrix(hosts: Sequence[RankHost]) -> list[list[str | list[str] | None]]:
    """MLX_IBV_DEVICES: row i, column j = rank i's device(s) towards rank j."""
    n = len(hosts)
    rows: list[list[str | list[str] | None]] = []
    for i, h in enumerate(hosts):
        row: list[str | list[str] | None] = []
        for j in range(n):
            d = h.rdma[j] if len(h.rdma) == n and i != j else None
            row.append(list(d) if isinstance(d, tuple) else d or None)
        rows.append(row)
    return rows


def rank_launch(backend: str, rank: int, hosts: Sequence[RankHost]) -> RankLaunch:
    """The environment and files of ``rank`` in a group of ``hosts`` (in rank order)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} is outside a group of {len(hosts)}")
    if not hosts[0].ring_addresses:
        raise ValueError("rank 0 needs an address every other rank can reach")
    env = {"MLX_RANK": str(rank)}
    if backend == "ring":
        # One listener per address (mlx.launch: per IP and connection); "" alone.
        ring = [list(h.ring_addresses) for h in hosts]
        return RankLaunch(env, {"MLX_HOSTFILE": json.dumps(ring) if len(ring) > 1 else ""})
    first = hosts[0].ring_addresses[0]
    host, _, port = first.rpartition(":")
    if backend == "nccl":
        env.update(
            NCCL_HOST_IP=host,
            NCCL_PORT=port,
            MLX_WORLD_SIZE=str(len(hosts)),
            # mlx.launch: rank % repeat_hosts; Pomona runs one rank per machine.
            CUDA_VISIBLE_DEVICES="0",
        )
        return RankLaunch(env)
    env["MLX_JACCL_COORDINATOR"] = first
    if backend == "jaccl-ring":
        env["MLX_JACCL_RING"] = "1"
    return RankLaunch(env, {"MLX_IBV_DEVICES": json.dumps(device_matrix(hosts))})


def devices_from_wire(devices: Sequence[str]) -> Devices:
    """A peer's devices as a list on the wire -> None, one name, or several."""
    if not devices:
        return None
    return devices[0] if len(devices) == 1 else tuple(devices)


def devices_to_wire(devices: Devices) -> list[str]:
    if devices is None:
        return []
    return [devices] if isinstance(devices, str) else list(devices)
