"""Links on the test bed with two networks: the ring runs on the faster one, re-forms over
the other when it is cut, and the coordinator's figures match the shaping.

Two workers share a "control" bridge (shaped to 100 Mbit/s, as an office network) with
the coordinator, and a "thunderbolt" bridge of their own (shaped to 1 Gbit/s). The
kernel here has no `netem`, so no delay can be added: RTTs are only shown.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from clusterkit import (
    coordinator_stub,
    generate_tokens,
    list_nodes,
    reference_tokens,
    wait_for,
    wait_serving,
    worker_stub,
)
from modelfactory import make_model
from testbed import WORKER_PORT, TestBed, bed_fixture

from pomona.links_view import link_line
from pomona.v1 import coordinator_pb2, worker_pb2

pytestmark = pytest.mark.netns

bed = bed_fixture(3, fast_hosts=2)

PROMPT = "Two Macs on a desk, one cable between them, and"
CONTROL_BITS = 100e6
FAST_BITS = 1e9
CONTROL_VECTOR_BYTES = 192 * 4  # what the head sends down the ring every step, at least


def ring_peers(bed: TestBed, host: int) -> set[tuple[str, str]]:
    """(local ip, peer ip) of the host's established TCP connections on the MLX ring port."""
    out = bed.host(host).check_output(["ss", "-Htn", "state", "established"])
    pairs = set()
    for line in out.splitlines():
        local, peer = line.split()[-2:]
        (lip, lport), (pip, pport) = local.rsplit(":", 1), peer.rsplit(":", 1)
        if WORKER_PORT + 1 in (int(lport), int(pport)):
            pairs.add((lip, pip))
    return pairs


def measured(
    reply: coordinator_pb2.ListNodesReply, src: str, address: str
) -> coordinator_pb2.LinkMeasurement:
    found = [x for x in reply.links if x.from_name == src and x.address == address]
    assert len(found) == 1, f"no single probe {src} -> {address}: {list(reply.links)}"
    return found[0]


def test_ring_runs_on_the_fast_network_and_reforms_over_the_other(
    bed: TestBed, tmp_path: Path
) -> None:
    for i in (0, 1):
        bed.throttle(i, rate="100mbit", burst="64kb", latency="100ms")
        bed.throttle(i, rate="1gbit", burst="256kb", latency="100ms", network="fast")
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    expected = reference_tokens(model, PROMPT, 24)
    cluster = f"links-{bed.run_id[-4:]}"
    bed.start_worker(0, "w0", cluster, tmp_path)
    w1 = bed.start_worker(1, "w1", cluster, tmp_path)
    coord = bed.start_coordinator(2, model, cluster, min_workers=2, layers="2,2")
    reply = wait_serving(coord, timeout=240)
    h0, h1 = bed.host(0), bed.host(1)
    print("\n".join(link_line(x) for x in reply.links))  # the figures, under -s

    # Every direction was probed at both of the other's addresses; the figures are
    # within 20% of the shaping (payload after TCP/IP headers: about 95% of the rate).
    for src, dst in (("w0", h1), ("w1", h0)):
        control = measured(reply, src, dst.ip)
        fast = measured(reply, src, dst.fast_ip)
        assert (control.kind, fast.kind) == ("other", "thunderbolt")
        assert (control.interface, fast.interface) == ("eth0", "thunderbolt0")
        assert abs(control.bandwidth_bytes_per_s * 8 / CONTROL_BITS - 1) < 0.2, control
        assert abs(fast.bandwidth_bytes_per_s * 8 / FAST_BITS - 1) < 0.2, fast
        assert fast.in_ring and not control.in_ring

    events = coordinator_stub(coord).Events(coordinator_pb2.EventsRequest(), timeout=10)
    plans = [e.message for e in events if e.kind == "plan_changed"]
    # Either rank order (both hold the model): each on its fast address.
    assert plans[-1].endswith(
        (
            f"; ring over w0 {h0.fast_ip}, w1 {h1.fast_ip}",
            f"; ring over w1 {h1.fast_ip}, w0 {h0.fast_ip}",
        )
    ), plans[-1]

    # A probe's sink opens only on an address of the worker's own, for a signed call.
    with pytest.raises(grpc.RpcError) as info:
        worker_stub(w1).LinkListen(worker_pb2.LinkListenRequest(host="198.51.100.7"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an address of this machine" in (info.value.details() or "")

    # The ring's connection joins the fast addresses, and its traffic crosses thunderbolt0.
    assert ring_peers(bed, 0) <= {(h0.fast_ip, h1.fast_ip)} and ring_peers(bed, 0)
    before = h0.interface_bytes("fast")
    tokens, _, _ = generate_tokens(coord, PROMPT, max_tokens=24)
    assert tokens == expected
    assert h0.interface_bytes("fast") - before >= len(tokens) * CONTROL_VECTOR_BYTES

    # Cut the fast link (w1 takes its interface down): the stalled ring is torn down,
    # the links measured again, and the cluster serves over the control network.
    load_id = reply.nodes[0].shard.load_id
    bed.interface_down(1, network="fast")
    tokens, _, _ = generate_tokens(coord, PROMPT, max_tokens=24)  # waits out the re-forming
    assert tokens == expected
    reply = wait_for(
        lambda: (r := list_nodes(coord)).serving and r.nodes[0].shard.load_id != load_id and r,
        60,
        "the cluster to serve a new load",
    )
    print("\n".join(link_line(x) for x in reply.links))
    assert ring_peers(bed, 0) <= {(h0.ip, h1.ip)} and ring_peers(bed, 0)
    assert measured(reply, "w0", h1.ip).in_ring and measured(reply, "w1", h0.ip).in_ring
    assert measured(reply, "w1", h0.fast_ip).error  # unreachable from w1 now
    events = coordinator_stub(coord).Events(coordinator_pb2.EventsRequest(), timeout=10)
    plans = [e.message for e in events if e.kind == "plan_changed"]
    assert "ring over" not in plans[-1]  # the addresses the workers were found at
