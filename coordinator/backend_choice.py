"""Which MLX backend a plan's group uses, and why: a pure function of what workers report.

``auto`` picks, as ``mlx.distributed_config`` does for Thunderbolt: JACCL when every
pair of ranks has a working RDMA device (a cable, and the device listed by
`ibv_devices`), JACCL over a ring (``jaccl-ring``) when the cables only join each rank
to its neighbours in the plan's order, NCCL when every worker runs MLX on CUDA, and the
ring over TCP otherwise. A backend given by name is used as asked; what it lacks is
said, and the coordinator falls back to the ring when it cannot form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pomona.backends import CHOICES, Devices, RankHost, missing_rdma
from pomona.v1 import worker_pb2


@dataclass(frozen=True)
class NodeFacts:
    """One rank as the choice sees it (``ports``: (interface, own uuid, peer uuid))."""

    name: str
    rdma_status: str = ""  # "" where the OS has no rdma_ctl (n/a)
    rdma_devices: tuple[str, ...] = ()
    ports: tuple[tuple[str, str, str], ...] = ()
    cuda: bool = False
    # Peers (by name) a working RDMA device joins this node to, where given by hand
    # (a nodes file) rather than found from ports.
    rdma_peers: tuple[str, ...] = ()
    # The backends this node's MLX has (Describe.backends); empty: not known.
    mlx_backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    reason: str
    # Every rank's devices towards every rank (empty tuple: none).
    rdma: tuple[tuple[tuple[str, ...], ...], ...] = ()

    def hosts(self, ring_addresses: Sequence[Sequence[str]]) -> list[RankHost]:
        """`pomona.backends` ranks: ring addresses, and the devices in MLX's shape."""
        return [
            RankHost(tuple(addrs), tuple(_devices(d) for d in row) if row else ())
            for addrs, row in zip(
                ring_addresses, self.rdma or [()] * len(ring_addresses), strict=True
            )
        ]


def _devices(devices: tuple[str, ...]) -> Devices:
    return None if not devices else devices[0] if len(devices) == 1 else devices


def facts_of(
    name: str, facts: worker_pb2.BackendFacts, mlx_backends: Sequence[str] = ()
) -> NodeFacts:
    return NodeFacts(
        name=name,
        rdma_status=facts.rdma_status,
        rdma_devices=tuple(facts.rdma_devices),
        ports=tuple(
            (p.interface, p.domain_uuid, p.peer_domain_uuid) for p in facts.thunderbolt_ports
        ),
        cuda=facts.cuda,
        mlx_backends=tuple(mlx_backends),
    )


def rdma_matrix(nodes: Sequence[NodeFacts]) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Row i, column j: node i's working RDMA devices towards node j, in port order."""
    owner = {uuid: j for j, n in enumerate(nodes) for _, uuid, _ in n.ports}
    by_name = {n.name: j for j, n in enumerate(nodes)}
    rows = []
    for i, n in enumerate(nodes):
        row: list[tuple[str, ...]] = [() for _ in nodes]
        for interface, _, peer in sorted(n.ports):
            j = owner.get(peer)
            device = f"rdma_{interface}"
            if j is not None and j != i and device in n.rdma_devices:
                row[j] += (device,)
        for peer_name in n.rdma_peers:
            j = by_name.get(peer_name, i)
            if j != i and not row[j]:
                row[j] = (f"rdma_{peer_name}",)
        rows.append(tuple(row))
    return tuple(rows)


def _pairs_text(nodes: Sequence[NodeFacts], pairs: Sequence[tuple[int, int]]) -> str:
    seen = sorted({tuple(sorted(p)) for p in pairs})
    text = ", ".join(f"{nodes[i].name}-{nodes[j].name}" for i, j in seen[:3])
    return text + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")


def _no_rdma(nodes: Sequence[NodeFacts]) -> str:
    """Why no node pair has RDMA, the most telling first."""
    hollow = [n.name for n in nodes if n.rdma_status == "enabled" and not n.rdma_devices]
    if hollow:
        return (
            f"rdma_ctl says enabled on {', '.join(hollow)} but ibv_devices lists no device "
            "(Thunderbolt 4 has no RDMA; it needs Thunderbolt 5)"
        )
    if all(not n.rdma_status and not n.rdma_peers for n in nodes):
        return "no worker reports RDMA (n/a: not macOS)"
    off = [n.name for n in nodes if n.rdma_status and n.rdma_status != "enabled"]
    if off:
        return f"RDMA is not enabled on {', '.join(off)} (rdma_ctl enable, in recovery mode)"
    return "no Thunderbolt cable with a working RDMA device joins the workers"


def choose_backend(
    requested: str, nodes: Sequence[NodeFacts], machines: Sequence[str] = ()
) -> BackendChoice:
    """The backend for ranks ``nodes`` (in rank order), and why.

    ``machines``: each rank's machine (its address), where known. NCCL takes one
    GPU per rank, and a Pomona rank uses its machine's first GPU, so two ranks on
    one machine (``pomona up --local``) cannot form an NCCL group.
    """
    if requested not in CHOICES:
        raise ValueError(f"unknown backend {requested!r}: use one of {', '.join(CHOICES)}")
    n = len(nodes)
    matrix = rdma_matrix(nodes)
    if n < 2:
        return BackendChoice("ring", "one worker: no group to form")
    hosts = BackendChoice("", "", matrix).hosts([("-",)] * n)
    missing = {b: missing_rdma(b, hosts) for b in ("jaccl", "jaccl-ring")}
    ring_text = "-".join(x.name for x in [*nodes, nodes[0]])
    if requested != "auto":
        reason = "as asked (--backend)"
        if requested in ("jaccl", "jaccl-ring") and missing[requested]:
            reason += (
                f"; but no RDMA device joins {_pairs_text(nodes, missing[requested])}: "
                "it will not form, and the ring takes over"
            )
        elif requested == "nccl" and not all(x.cuda for x in nodes):
            reason += "; but not every worker runs MLX on CUDA: the ring takes over if it fails"
        elif requested == "nccl" and (shared := _shared_machines(nodes, machines)):
            reason += f"; but {shared}: it will not form, and the ring takes over"
        return BackendChoice(requested, reason, matrix)
    lacking = {
        b: [x.name for x in nodes if x.mlx_backends and b not in x.mlx_backends]
        for b in ("jaccl", "nccl")
    }
    if all(x.cuda for x in nodes) and not lacking["nccl"]:
        shared = _shared_machines(nodes, machines)
        if not shared:
            return BackendChoice("nccl", "every worker runs MLX on CUDA")
        return BackendChoice("ring", f"TCP: every worker runs MLX on CUDA, but {shared}")
    if lacking["jaccl"]:
        return BackendChoice(
            "ring", f"TCP: MLX on {', '.join(lacking['jaccl'])} has no JACCL (macOS 26.2+)"
        )
    if not missing["jaccl"]:
        return BackendChoice("jaccl", "an RDMA device joins every pair of workers", matrix)
    if not missing["jaccl-ring"]:
        return BackendChoice(
            "jaccl-ring",
            f"Thunderbolt cables with RDMA form only a ring ({ring_text}); JACCL's mesh "
            f"needs a cable between every pair (missing: {_pairs_text(nodes, missing['jaccl'])})",
            matrix,
        )
    if any(any(row) for row in matrix):
        why = f"no RDMA device joins {_pairs_text(nodes, missing['jaccl-ring'])}"
    else:
        why = _no_rdma(nodes)
    return BackendChoice("ring", f"TCP: {why}")


def _shared_machines(nodes: Sequence[NodeFacts], machines: Sequence[str]) -> str:
    """Why NCCL cannot form when some ranks share a machine ("" when none do)."""
    seen: dict[str, list[str]] = {}
    for node, machine in zip(nodes, machines, strict=False):
        seen.setdefault(machine, []).append(node.name)
    shared = [names for names in seen.values() if len(names) > 1]
    if not shared:
        return ""
    return (
        f"{', '.join(shared[0])} share one machine and its first GPU (NCCL takes one GPU per rank)"
    )


def rdma_rows(choice: BackendChoice) -> list[worker_pb2.RdmaRow]:
    """The device matrix as LoadRequest.rdma carries it (only JACCL needs it)."""
    if not choice.backend.startswith("jaccl"):
        return []
    return [
        worker_pb2.RdmaRow(peers=[worker_pb2.RdmaPeer(devices=list(d)) for d in row])
        for row in choice.rdma
    ]


def described_facts(
    nodes: Sequence[tuple[str, bool]], cables: Sequence[tuple[str, str]] | None
) -> dict[str, NodeFacts]:
    """Facts of machines described by hand, (name, rdma) each: RDMA nodes joined by
    ``cables``, or each to every other RDMA node when no cables are given."""
    rdma = {name for name, has in nodes if has}
    peers: dict[str, set[str]] = {name: set() for name, _ in nodes}
    if cables is None:
        pairs = [(a, b) for a in rdma for b in rdma if a != b]
    else:
        unknown = sorted({x for c in cables for x in c} - set(peers))
        if unknown:
            raise ValueError(f"rdma_cables names unknown nodes: {', '.join(unknown)}")
        pairs = [(a, b) for a, b in cables if a in rdma and b in rdma]
    for a, b in pairs:
        peers[a].add(b)
        peers[b].add(a)
    return {
        name: NodeFacts(
            name, "enabled" if has else "disabled", rdma_peers=tuple(sorted(peers[name]))
        )
        for name, has in nodes
    }
