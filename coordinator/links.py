"""Links between workers: which addresses join each pair, how fast each is, which the ring uses.

Before planning, the coordinator probes the link from every worker to every other at
each address the other may be reached at (its IPv4 addresses on interfaces whose link
is up; only the address it was found at for a worker on loopback): ``LinkListen`` on
the receiver, ``LinkProbe`` on the sender (`worker/link_probe.py`), one probe at a time
so probes do not share a link. Figures are kept until the topology changes: a worker
joins or leaves, an address or a link state changes, or the pipeline fails (a cut cable
shows first as a stalled ring). Each ring neighbour pair then uses the address on the
fastest link (most bandwidth; the lower RTT breaks near-ties), and the planner gets the
measured latency and bandwidth instead of assuming 10 GbE.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from pomona.coordinator.planner import Link
from pomona.v1 import coordinator_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

PROBE_BYTES = 32 << 20  # the most one probe sends
PROBE_SEND_S = 0.25  # or it sends for this long
PROBE_PINGS = 10
PROBE_TIMEOUT_S = 3.0
# Where a pair has several addresses to choose between, each is probed this many times,
# interleaved with the others, and keeps its best figures: a busy endpoint only ever
# slows a probe down (a reader not scheduled shrinks TCP's window), so the best of a
# few is the link's. A pair with one address is probed once.
PROBE_ROUNDS = 3
NEAR_TIE = 0.9  # bandwidths within 10% of each other: the lower RTT wins


class LinkMember(Protocol):
    """What links need of a cluster member (coordinator/cluster.py's Member)."""

    node_id: str
    name: str
    describe: worker_pb2.DescribeReply
    stub: worker_pb2_grpc.WorkerStub

    @property
    def host(self) -> str: ...


@dataclass(frozen=True)
class Candidate:
    address: str
    interface: str  # "" when no interface reported it (the address it was found at)
    kind: str


@dataclass(frozen=True)
class Measurement:
    src: str  # node ids
    dst: str
    candidate: Candidate
    rtt_ms: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    error: str = ""
    measured_at: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and self.bandwidth_bytes_per_s > 0


def best_of(old: Measurement | None, new: Measurement) -> Measurement:
    """The better of two probes of one address: most bandwidth, least RTT (a failed probe
    counts only when no other worked)."""
    if old is None or not old.ok:
        return new
    if not new.ok:
        return old
    top = max((old, new), key=lambda m: m.bandwidth_bytes_per_s)
    return replace(top, rtt_ms=min(old.rtt_ms, new.rtt_ms))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def candidates(member: LinkMember) -> list[Candidate]:
    """The addresses ``member`` may be reached at: the one it was found at first, then
    its other IPv4 addresses on interfaces whose link is up (none for a worker found on
    loopback: its other addresses reach the same machine)."""
    found = member.host
    by_address = {
        a: (i.name, i.kind) for i in member.describe.interfaces for a in i.addresses if ":" not in a
    }
    name, kind = by_address.get(found, ("", "loopback" if _loopback(found) else ""))
    out = [Candidate(found, name, kind)]
    if _loopback(found):
        return out
    for i in member.describe.interfaces:
        if i.kind == "loopback" or not i.is_up or i.link_state == "down":
            continue
        for a in i.addresses:
            if ":" in a or a == found or _loopback(a):
                continue
            out.append(Candidate(a, i.name, i.kind))
    return out


TopologyKey = frozenset[tuple[str, str, tuple[Candidate, ...]]]


def topology_key(members: Sequence[LinkMember]) -> TopologyKey:
    return frozenset((m.node_id, m.host, tuple(candidates(m))) for m in members)


def _probes(members: Sequence[LinkMember]) -> list[tuple[LinkMember, LinkMember, Candidate]]:
    """Every (from, to, address) worth probing."""
    probes = []
    for src in members:
        own = {a for i in src.describe.interfaces for a in i.addresses}
        for dst in members:
            if src is dst:
                continue
            for c in candidates(dst):
                if c.address in own and c.address != dst.host:
                    continue  # an address both hold (docker0, say) reaches itself
                probes.append((src, dst, c))
    return probes


class Links:
    """Measured links, by (from, to, address); re-measured when the topology changes."""

    def __init__(
        self,
        nbytes: int = PROBE_BYTES,
        pings: int = PROBE_PINGS,
        timeout_s: float = PROBE_TIMEOUT_S,
        send_s: float = PROBE_SEND_S,
        rounds: int = PROBE_ROUNDS,
    ) -> None:
        self.nbytes, self.pings, self.timeout_s = nbytes, pings, timeout_s
        self.send_s, self.rounds = send_s, rounds
        self.figures: dict[tuple[str, str, str], Measurement] = {}
        self.names: dict[str, str] = {}
        self.ring: set[tuple[str, str, str]] = set()  # (from, to, address) the ring uses
        self._key: TopologyKey | None = None
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        """Measure again before the next plan (the pipeline failed: a link may be cut)."""
        self._key = None

    def measured(self, members: Sequence[LinkMember]) -> bool:
        return topology_key(members) == self._key

    def has_choices(self, members: Sequence[LinkMember]) -> bool:
        """Whether some worker can be reached at more than one address: only then does
        the ring's address depend on what the probes find."""
        choices = Counter((src.node_id, dst.node_id) for src, dst, _ in _probes(members))
        return any(n > 1 for n in choices.values())

    async def measure(self, members: Sequence[LinkMember]) -> None:
        """Probe every ordered pair at every candidate address, unless already done for
        this topology."""
        async with self._lock:
            key = topology_key(members)
            if key == self._key:
                return
            started = time.monotonic()
            probes = _probes(members)
            choices = Counter((src.node_id, dst.node_id) for src, dst, _ in probes)
            figures: dict[tuple[str, str, str], Measurement] = {}
            for n in range(self.rounds):
                for src, dst, c in probes:
                    key3 = (src.node_id, dst.node_id, c.address)
                    if n and choices[(src.node_id, dst.node_id)] == 1:
                        continue  # one address, nothing to choose: once is enough
                    if key3 in figures and not figures[key3].ok:
                        continue  # unreachable: once is enough
                    figures[key3] = best_of(figures.get(key3), await self._probe(src, dst, c))
            self.figures = figures
            self.names = {m.node_id: m.name for m in members}
            self.ring = set()
            self._key = key
            if figures:
                log.info(
                    "measured %d links in %.2f s: %s",
                    len(figures),
                    time.monotonic() - started,
                    "; ".join(describe(m, self.names) for m in figures.values()),
                )

    async def _probe(self, src: LinkMember, dst: LinkMember, c: Candidate) -> Measurement:
        at = time.time()
        try:
            sink = await dst.stub.LinkListen(
                worker_pb2.LinkListenRequest(host=c.address, max_bytes=self.nbytes), timeout=5.0
            )
            reply = await src.stub.LinkProbe(
                worker_pb2.LinkProbeRequest(
                    host=c.address,
                    port=sink.port,
                    ticket=sink.ticket,
                    bytes=self.nbytes,
                    pings=self.pings,
                    timeout_s=self.timeout_s,
                    send_s=self.send_s,
                ),
                timeout=self.timeout_s + 5.0,
            )
        except grpc.aio.AioRpcError as e:
            return Measurement(src.node_id, dst.node_id, c, error=e.details() or str(e.code()))
        return Measurement(
            src.node_id,
            dst.node_id,
            c,
            rtt_ms=reply.rtt_ms,
            bandwidth_bytes_per_s=reply.bandwidth_bytes_per_s,
            error=reply.error,
            measured_at=at,
        )

    def best(self, src: str, dst: str) -> Measurement | None:
        """The fastest working link from ``src`` to ``dst``, None when none was measured."""
        ok = [m for (s, d, _), m in self.figures.items() if (s, d) == (src, dst) and m.ok]
        if not ok:
            return None
        top = max(m.bandwidth_bytes_per_s for m in ok)
        near = [m for m in ok if m.bandwidth_bytes_per_s >= NEAR_TIE * top]
        return min(near, key=lambda m: m.rtt_ms)

    def ring_hosts(self, ordered: Sequence[LinkMember]) -> list[str]:
        """Rank i's listen address as rank i-1 reaches it on the fastest link (the address
        it was found at where nothing was measured); remembered for display."""
        hosts = []
        self.ring = set()
        for i, m in enumerate(ordered):
            prev = ordered[i - 1]
            best = self.best(prev.node_id, m.node_id) if prev is not m else None
            host = best.candidate.address if best else m.host
            if best:
                self.ring.add((prev.node_id, m.node_id, host))
            hosts.append(host)
        return hosts

    def planner_links(self) -> list[Link]:
        """One Link per pair: the fastest direction's best figure (one-way latency = RTT/2)."""
        out: dict[frozenset[str], Link] = {}
        for src, dst in {(s, d) for s, d, _ in self.figures}:
            best = self.best(src, dst)
            if best is None:
                continue
            link = Link(
                src,
                dst,
                latency_ms=best.rtt_ms / 2,
                bandwidth_gbs=best.bandwidth_bytes_per_s / 1e9,
                kind=best.candidate.kind or "unknown",
            )
            pair = frozenset((src, dst))
            if pair not in out or link.bandwidth_gbs > out[pair].bandwidth_gbs:
                out[pair] = link
        return list(out.values())

    def to_proto(self) -> list[coordinator_pb2.LinkMeasurement]:
        return [
            coordinator_pb2.LinkMeasurement(
                from_node_id=m.src,
                from_name=self.names.get(m.src, m.src),
                to_node_id=m.dst,
                to_name=self.names.get(m.dst, m.dst),
                address=m.candidate.address,
                interface=m.candidate.interface,
                kind=m.candidate.kind,
                rtt_ms=m.rtt_ms,
                bandwidth_bytes_per_s=m.bandwidth_bytes_per_s,
                error=m.error,
                in_ring=key in self.ring,
                measured_at=m.measured_at,
            )
            for key, m in sorted(
                self.figures.items(),
                key=lambda kv: (self.names.get(kv[0][0], ""), self.names.get(kv[0][1], ""), kv[0]),
            )
        ]


def describe(m: Measurement, names: dict[str, str]) -> str:
    where = f"{m.candidate.address} ({m.candidate.interface or '?'}, {m.candidate.kind or '?'})"
    head = f"{names.get(m.src, m.src)} -> {names.get(m.dst, m.dst)} at {where}"
    if m.error:
        return f"{head}: {m.error}"
    return f"{head}: {m.rtt_ms:.2f} ms RTT, {m.bandwidth_bytes_per_s * 8 / 1e6:.0f} Mbit/s"


def links_from_proto(measurements: Sequence[coordinator_pb2.LinkMeasurement]) -> list[Link]:
    """Planner links from what a coordinator reports: per pair, the fastest working probe."""
    out: dict[frozenset[str], Link] = {}
    for m in measurements:
        if m.error or m.bandwidth_bytes_per_s <= 0:
            continue
        link = Link(
            m.from_node_id,
            m.to_node_id,
            latency_ms=m.rtt_ms / 2,
            bandwidth_gbs=m.bandwidth_bytes_per_s / 1e9,
            kind=m.kind or "unknown",
        )
        pair = frozenset((link.a, link.b))
        if pair not in out or link.bandwidth_gbs > out[pair].bandwidth_gbs:
            out[pair] = link
    return list(out.values())
