"""Links without a cluster: interface facts, the probe's sink and prober, which address
each ring neighbour pair uses, and links in the planner and the nodes file.

Recorded: `networksetup -listallhardwareports` of an M3 Ultra Mac Studio (Thunderbolt
1-6 on en2-en7). Not recorded anywhere we could find: `system_profiler
SPThunderboltDataType -json`; its fixture below follows what mlx.distributed_config
reads from it (buses with domain_uuid_key, receptacle_1_tag.receptacle_id_key, _items).
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from macos_recordings import recorded

from pomona.coordinator.links import Candidate, Links, Measurement, candidates, links_from_proto
from pomona.coordinator.nodes_file import NodesFileError, load_links, load_nodes_file
from pomona.coordinator.plan_cli import plan_command
from pomona.v1 import worker_pb2
from pomona.worker.backend_facts import interface_peers, read_backend_facts
from pomona.worker.hardware import interface_kind, linux_link_state
from pomona.worker.hardware_parsers import parse_networksetup_ports
from pomona.worker.link_probe import (
    MAX_BYTES,
    LinkProbeError,
    LinkSink,
    check_probe_request,
    probe,
    received_rate,
)

PORTS_M3_ULTRA = (
    "networksetup_listallhardwareports__knurlogic_Mac15-14_M3Ultra_MacStudio_trimmed.txt"
)
PEER = "5D8B1C2A-0000-4000-8000-00000000C0DE"


def test_thunderbolt_ports_carry_their_kind_and_the_peer_cabled_to_them() -> None:
    ports = recorded(PORTS_M3_ULTRA)
    # Not recorded: SPThunderboltDataType with a cable in receptacle 2 only.
    buses = [
        {
            "domain_uuid_key": f"OWN-{tag}",
            "receptacle_1_tag": {"receptacle_id_key": str(tag)},
            "_items": [{"_name": "Mac Studio", "domain_uuid_key": PEER}] if tag == 2 else [],
        }
        for tag in (1, 2, 3)
    ]
    outputs = {
        "system_profiler": json.dumps({"SPThunderboltDataType": buses}),
        "networksetup": ports,
    }
    facts = read_backend_facts(lambda argv: outputs.get(argv[0]), system="Darwin")
    assert interface_peers(facts) == {"en2": "", "en3": PEER, "en4": ""}
    kinds = {
        dev: interface_kind(dev, loopback=False, hardware_port=port)
        for dev, port in parse_networksetup_ports(ports).items()
    }
    assert kinds == {
        "en0": "ethernet",
        "en1": "wifi",
        **{f"en{i}": "thunderbolt" for i in range(2, 8)},
        **{f"en{i}": "other" for i in range(8, 14)},  # idle USB-C ports' placeholders
    }


def test_linux_operstate_becomes_a_link_state() -> None:
    assert linux_link_state("up\n", True) == "up"
    assert linux_link_state("down\n", True) == "down"  # no carrier
    assert linux_link_state("lowerlayerdown", True) == "down"  # a veth whose peer is down
    assert linux_link_state("unknown", True) == "up"  # loopback, tun: carries traffic
    assert linux_link_state("unknown", False) == "down"
    assert linux_link_state(None, True) == "unknown"


# -- the probe -------------------------------------------------------------------------


def test_the_sink_serves_only_the_ticket_holder_and_the_prober_measures() -> None:
    sink = LinkSink("127.0.0.1", 4 << 20)
    stranger = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    stranger.sendall(b"x" * 32)
    assert stranger.recv(1) == b""  # closed on a wrong ticket
    stranger.close()
    result = probe("127.0.0.1", sink.port, sink.ticket, 4 << 20, 5, 5.0)
    assert result.bytes == 4 << 20
    assert result.bandwidth_bytes_per_s > 0 and result.rtt_ms > 0
    with pytest.raises(ConnectionError):  # one probe per sink: refused, or reset if queued
        probe("127.0.0.1", sink.port, sink.ticket, 1 << 20, 1, 2.0)


def test_the_rate_leaves_out_the_first_tenth_of_the_time() -> None:
    # A shaper's burst: 1 MB at once, then 1 MB per 0.1 s for a second.
    samples = [(0.0, 1_000_000)] + [(0.1 * i, 1_000_000 * (i + 1)) for i in range(1, 11)]
    assert received_rate(samples) == pytest.approx(10e6)
    assert received_rate([(0.0, 5)]) == 0.0


def test_bad_probe_requests_say_what_is_wrong() -> None:
    with pytest.raises(LinkProbeError, match="not an address of this machine"):
        LinkSink("198.51.100.7")
    ticket = b"t" * 32
    cases = [
        (("", 1, ticket, 1, 1, 1.0), "host is empty"),
        (("h", 0, ticket, 1, 1, 1.0), "port 0 is not a TCP port"),
        (("h", 1, b"short", 1, 1, 1.0), "the ticket must be the 32 bytes"),
        (("h", 1, ticket, MAX_BYTES + 1, 1, 1.0), "bytes must be 1 to"),
        (("h", 1, ticket, 1, 1000, 1.0), "pings must be 0 to 100"),
        (("h", 1, ticket, 1, 1, 60.0), "timeout_s must be above 0 and at most 30"),
        (("h", 1, ticket, 1, 1, 1.0, 2.0), "send_s must be 0 or more and less than timeout_s"),
    ]
    for args, message in cases:
        with pytest.raises(LinkProbeError, match=message):
            check_probe_request(*args)


# -- which address each pair uses -------------------------------------------------------


class FakeMember:
    def __init__(self, node_id: str, host: str, interfaces: list[worker_pb2.NetworkInterface]):
        self.node_id, self.name, self.host = node_id, node_id, host
        self.describe = worker_pb2.DescribeReply(node_id=node_id, interfaces=interfaces)
        self.stub: Any = None


def nic(name: str, kind: str, *addresses: str, up: bool = True) -> worker_pb2.NetworkInterface:
    state = "up" if up else "down"
    return worker_pb2.NetworkInterface(
        name=name, kind=kind, addresses=list(addresses), is_up=True, link_state=state
    )


def test_candidates_are_the_found_address_then_other_ipv4_on_links_that_are_up() -> None:
    m = FakeMember(
        "a",
        "10.0.0.1",
        [
            nic("lo0", "loopback", "127.0.0.1", "::1"),
            nic("en0", "wifi", "10.0.0.1", "fe80::1"),
            nic("bridge0", "thunderbolt", "169.254.3.1"),
            nic("en5", "ethernet", "192.168.9.1", up=False),
        ],
    )
    assert [c.address for c in candidates(m)] == ["10.0.0.1", "169.254.3.1"]
    assert candidates(m)[1] == Candidate("169.254.3.1", "bridge0", "thunderbolt")
    # A worker found on loopback: its other addresses reach the same machine.
    local = FakeMember("b", "127.0.0.1", [nic("eth0", "ethernet", "10.1.0.5")])
    assert candidates(local) == [Candidate("127.0.0.1", "", "loopback")]


def figure(src: str, dst: str, address: str, mbit: float, rtt: float = 0.1) -> Measurement:
    return Measurement(src, dst, Candidate(address, "", ""), rtt, mbit * 1e6 / 8)


def test_each_ring_neighbour_pair_uses_the_fastest_link() -> None:
    links = Links()
    a = FakeMember("a", "10.0.0.1", [])
    b = FakeMember("b", "10.0.0.2", [])
    c = FakeMember("c", "10.0.0.3", [])
    measured = [
        figure("a", "b", "10.0.0.2", 900),
        figure("a", "b", "169.254.0.2", 9000),  # b over Thunderbolt: the fastest
        figure("b", "c", "10.0.0.3", 900, rtt=0.3),
        figure("b", "c", "10.9.0.3", 850, rtt=0.1),  # within 10%: the lower RTT wins
        Measurement("c", "a", Candidate("169.254.0.1", "", ""), error="unreachable"),
    ]
    links.figures = {(m.src, m.dst, m.candidate.address): m for m in measured}
    # Rank i's address as rank i-1 reaches it; nothing measured c -> a: a's own address.
    assert links.ring_hosts([a, b, c]) == ["10.0.0.1", "169.254.0.2", "10.9.0.3"]
    planner = {frozenset((x.a, x.b)): x for x in links.planner_links()}
    assert set(planner) == {frozenset("ab"), frozenset("bc")}
    assert planner[frozenset("ab")].bandwidth_gbs == pytest.approx(9000e6 / 8 / 1e9)
    assert planner[frozenset("ab")].latency_ms == pytest.approx(0.05)  # RTT / 2
    shown = links.to_proto()
    assert [x.address for x in shown if x.in_ring] == ["169.254.0.2", "10.9.0.3"]
    assert {frozenset((x.a, x.b)) for x in links_from_proto(shown)} == set(planner)


class FakeStub:
    """A worker's LinkListen/LinkProbe: probes of an address in ``rates`` succeed at the
    next of its Mbit/s figures in turn (a busy machine measures low at times)."""

    def __init__(self, rates: dict[str, list[float]], calls: list[str]) -> None:
        self.rates, self.calls = rates, calls

    async def LinkListen(self, request, timeout):  # noqa: N802
        return worker_pb2.LinkListenReply(port=1, ticket=b"t" * 32)

    async def LinkProbe(self, request, timeout):  # noqa: N802
        self.calls.append(request.host)
        if request.host not in self.rates:
            return worker_pb2.LinkProbeReply(error=f"{request.host}:1: Network is unreachable")
        figures = self.rates[request.host]
        mbit = figures[self.calls.count(request.host) % len(figures)]
        return worker_pb2.LinkProbeReply(rtt_ms=mbit / 1000, bandwidth_bytes_per_s=mbit * 1e6 / 8)


def test_measuring_skips_shared_addresses_and_is_cached_until_the_topology_changes() -> None:
    calls: list[str] = []
    rates = {"10.0.0.1": [100.0], "10.0.0.2": [100.0], "10.9.0.2": [300.0, 1000.0]}
    a = FakeMember("a", "10.0.0.1", [nic("eth0", "ethernet", "10.0.0.1"),
                                     nic("docker0", "other", "172.17.0.1")])  # fmt: skip
    b = FakeMember("b", "10.0.0.2", [nic("eth0", "ethernet", "10.0.0.2"),
                                     nic("docker0", "other", "172.17.0.1"),
                                     nic("thunderbolt0", "thunderbolt", "10.9.0.2")])  # fmt: skip
    a.stub = b.stub = FakeStub(rates, calls)
    links = Links(rounds=2)
    asyncio.run(links.measure([a, b]))
    # a probes b at its two own addresses (not the docker0 both hold), each twice,
    # interleaved; b probes a at its one address, once.
    assert calls == ["10.0.0.2", "10.9.0.2", "10.0.0.1", "10.0.0.2", "10.9.0.2"]
    assert links.ring_hosts([a, b]) == ["10.0.0.1", "10.9.0.2"]
    fast = links.figures[("a", "b", "10.9.0.2")]  # the best of 300 and 1000 Mbit/s
    assert (fast.bandwidth_bytes_per_s, fast.rtt_ms) == (1000e6 / 8, 0.3)
    asyncio.run(links.measure([a, b]))
    assert len(calls) == 5  # nothing changed: the figures are kept
    links.forget()  # the pipeline failed
    del rates["10.9.0.2"]  # the cable is cut: unreachable once, not probed again
    asyncio.run(links.measure([a, b]))
    assert calls[5:] == ["10.0.0.2", "10.9.0.2", "10.0.0.1", "10.0.0.2"]
    assert links.ring_hosts([a, b]) == ["10.0.0.1", "10.0.0.2"]
    failed = [x for x in links.to_proto() if x.error]
    assert [(x.address, x.interface, x.kind) for x in failed] == [
        ("10.9.0.2", "thunderbolt0", "thunderbolt")
    ]
    b.describe.interfaces[2].link_state = "down"  # b reports the link down: a new topology
    asyncio.run(links.measure([a, b]))
    assert calls[9:] == ["10.0.0.2", "10.0.0.1"]  # one address each: probed once


# -- links in the nodes file and the planner ----------------------------------------------


NODES = """
nodes:
  - {name: studio, chip: Apple M2 Ultra, memory_gb: 32, count: 2}
links:
  - {between: [studio-1, studio-2], latency_ms: %s, gbit: %s, kind: thunderbolt}
"""


def test_pomona_plan_takes_links_from_the_nodes_file(tmp_path: Path) -> None:
    def plan(latency: str, gbit: str, *extra: str) -> str:
        file = tmp_path / f"nodes-{latency}-{gbit}.yaml"
        file.write_text(NODES % (latency, gbit))
        args = ["llama-3.1-70b", "--bits", "4", "--nodes", str(file), *extra]
        result = CliRunner().invoke(plan_command, args)
        assert result.exit_code == 0, result.output
        return result.output

    shown = plan("0.05", "40")
    assert "link studio-1 -> studio-2: 0.05 ms, 5 GB/s (thunderbolt)" in shown
    assert "links not measured" not in shown
    fast = json.loads(plan("0.05", "40", "--json"))
    slow = json.loads(plan("5", "1", "--json"))
    assert [s["name"] for s in fast["stages"]] == ["studio-1", "studio-2"]
    # The same plan, predicted slower over a slower link.
    assert fast["decode_tokens_per_s"] > slow["decode_tokens_per_s"]
    assert slow["links"][0]["bandwidth_gbs"] == 1 / 8


def test_bad_links_in_a_nodes_file_say_what_to_fix(tmp_path: Path) -> None:
    cases = {
        "{between: [studio-1, mini], latency_ms: 1, gbit: 1}": "no node is named 'mini'",
        "{between: [studio-1, studio-1], latency_ms: 1, gbit: 1}": "two different nodes",
        "{between: [studio-1, studio-2], gbit: 1}": "missing latency_ms",
        "{between: [studio-1, studio-2], latency_ms: 1}": "give the bandwidth once",
        "{between: [studio-1, studio-2], latency_ms: -1, gbit: 1}": "latency_ms must be a number",
        "{between: [studio-1, studio-2], latency_ms: 1, gbit: 1, mtu: 9000}": "unknown key mtu",
    }
    for entry, message in cases.items():
        file = tmp_path / "nodes.yaml"
        file.write_text(f"nodes:\n  - {{name: studio, chip: M2 Ultra, memory_gb: 64, count: 2}}\n"
                        f"links:\n  - {entry}\n")  # fmt: skip
        with pytest.raises(NodesFileError, match=message):
            load_links(file, load_nodes_file(file))
