"""The multi-host test bed: isolation, a real cluster across hosts, every
fault primitive, and a teardown that leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from clusterkit import describe, generate_tokens, reference_tokens, wait_for, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelfactory import make_model
from testbed import (
    PREFIX,
    SUBNET,
    WORKER_PORT,
    BedProc,
    Host,
    TestBed,
    bed_fixture,
    netns_names,
    netns_pids,
    open_bed,
    skip_unless_available,
    unavailable_reason,
    wait_until,
)

from pomona import rpc

pytestmark = pytest.mark.netns

PROMPT = "The lab has four machines and"
MB = 1 << 20

bed = bed_fixture(3)


def root_network() -> dict[str, str]:
    """What the root namespace's network looks like: links, IPv4 addresses and routes."""

    def sh(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout

    links = sorted(line.split(":")[1].strip() for line in sh("ip", "-o", "link").splitlines())
    return {
        "links": " ".join(links),
        "addresses": sh("ip", "-o", "-4", "addr"),
        "routes": sh("ip", "-4", "route", "show", "table", "all"),
    }


def root_gateway() -> str:
    """The root namespace's default gateway (TEST-NET-1's first address if it has none)."""
    out = subprocess.run(
        ["ip", "-4", "route", "show", "default"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return out[out.index("via") + 1] if "via" in out else "192.0.2.1"


def links_of(host: Host) -> list[str]:
    out = host.check_output(["ip", "-o", "link"])
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


# -- (a) isolation ------------------------------------------------------------------


def test_hosts_reach_each_other_and_nothing_else(tmp_path: Path) -> None:
    skip_unless_available(("ip", "tc", "ping"))
    before = root_network()
    with open_bed(3, tmp_path) as bed:
        assert [h.ip for h in bed.hosts] == [f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"]
        for a in bed.hosts:
            for b in bed.hosts:
                if a is not b:
                    assert a.ping(b.ip), f"{a.ns} cannot reach {b.ip}"
        # No route leads out of a host: these fail at once, sending nothing.
        for ip in ("198.18.1.1", root_gateway()):
            assert not bed.host(0).ping(ip, count=1), f"{ip} answered from inside the bed"
        routes = bed.host(0).check_output(["ip", "-4", "route"])
        assert "default" not in routes
        assert links_of(bed.host(0)) == ["eth0", "lo"]
        bridge = sorted(
            line.split(":")[1].strip().split("@")[0]
            for line in subprocess.check_output(
                ["ip", "-n", bed.bridge_ns, "-o", "link"], text=True
            ).splitlines()
        )
        assert bridge == ["br0", "lo", "vh0", "vh1", "vh2"]
        assert root_network() == before, "the bed changed the root namespace"
    assert root_network() == before


# -- (b) a real cluster across hosts ---------------------------------------------------


def test_cluster_across_hosts_matches_single_process(bed: TestBed, tmp_path: Path) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    expected = reference_tokens(model, PROMPT, 24)
    cluster = f"bed-{bed.run_id[-4:]}"
    w0 = bed.start_worker(0, "w0", cluster, tmp_path)
    # w1 and the coordinator pick their own addresses and mDNS interfaces, as on a Mac.
    w1 = bed.start_worker(1, "w1", cluster, tmp_path, pin_address=False)
    # No --worker seeds: the coordinator can only learn of the workers by mDNS.
    coord = bed.start_coordinator(2, model, cluster, min_workers=2, layers="2,2", pin_address=False)
    reply = wait_serving(coord, timeout=240)
    assert sorted(n.address for n in reply.nodes) == [w0.grpc_address, w1.grpc_address]
    assert {n.node_id for n in reply.nodes} == {describe(w0).node_id, describe(w1).node_id}

    tokens, _, last = generate_tokens(coord, PROMPT, max_tokens=24)
    assert tokens == expected
    assert last.usage.completion_tokens == len(tokens)

    # The MLX ring runs over the bridge: a TCP connection between the two hosts
    # with a worker's ring port (gRPC port + 1) on one end.
    ring_port = WORKER_PORT + 1
    pairs = {(w0.ip, w1.ip), (w1.ip, w0.ip)}

    def ring_connected() -> bool:
        out = bed.host(0).check_output(["ss", "-Htn", "state", "established"])
        for line in out.splitlines():
            local, peer = line.split()[-2:]
            (lip, lport), (pip, pport) = local.rsplit(":", 1), peer.rsplit(":", 1)
            if (lip, pip) in pairs and ring_port in (int(lport), int(pport)):
                return True
        return False

    assert ring_connected(), "no ring connection between the hosts"


# -- (c) faults --------------------------------------------------------------------------


def health(proc: BedProc, timeout: float = 1.0) -> grpc.StatusCode:
    """OK when the daemon answers a health check within ``timeout``, else the error code."""
    channel = rpc.channel(proc.address)
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return, attr-defined]
    finally:
        channel.close()


def test_frozen_worker_stops_answering_until_thawed_and_killed_worker_is_gone(
    bed: TestBed, tmp_path: Path
) -> None:
    worker = bed.start_worker(0, "w0", "faults", tmp_path)
    wait_for(lambda: health(worker) == grpc.StatusCode.OK, 60, "the worker to answer")

    bed.freeze(worker)
    start = time.monotonic()
    wait_until(
        lambda: health(worker) == grpc.StatusCode.DEADLINE_EXCEEDED, 10, "the frozen worker to hang"
    )
    assert time.monotonic() - start < 5
    assert worker.alive()
    bed.thaw(worker)
    wait_until(lambda: health(worker) == grpc.StatusCode.OK, 15, "the thawed worker to answer")

    # A frozen host: every process in it stops, and comes back with it.
    frozen = bed.freeze_host(0)
    assert worker.popen.pid in frozen
    wait_until(lambda: health(worker) == grpc.StatusCode.DEADLINE_EXCEEDED, 10, "a frozen host")
    bed.thaw_host(0)
    wait_until(lambda: health(worker) == grpc.StatusCode.OK, 15, "the thawed host to answer")

    bed.freeze(worker)  # kill works on a frozen process too
    bed.kill(worker, signal.SIGKILL)
    assert worker.popen.wait(10) == -signal.SIGKILL
    wait_until(lambda: health(worker) == grpc.StatusCode.UNAVAILABLE, 10, "the worker to be gone")


def connects(client: Host, server: Host, port: int, timeout: float = 1.0) -> bool:
    with client.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect((server.ip, port))
        except OSError:
            return False
        return True


def test_link_down_cuts_a_host_off_until_link_up(bed: TestBed) -> None:
    skip_unless_available(("ip", "tc", "ping"))
    a, b, c = bed.hosts
    listener = b.socket()
    listener.bind((b.ip, 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    assert a.ping(b.ip) and connects(a, b, port)

    bed.link_down(1)
    assert not a.ping(b.ip, count=1)
    assert not c.ping(b.ip, count=1)
    assert not connects(a, b, port)
    assert a.ping(c.ip), "the other hosts still reach each other"

    bed.link_up(1)
    wait_until(lambda: a.ping(b.ip, count=1), 15, "the host to be reachable again", interval=0.2)
    assert connects(a, b, port)


def transfer_seconds(sender: Host, receiver: Host, size: int = MB, limit: float = 30.0) -> float:
    """Seconds to send ``size`` bytes from one host to another over TCP (bounded by ``limit``)."""
    listener = receiver.socket()
    listener.bind((receiver.ip, 0))
    listener.listen(1)
    listener.settimeout(limit)
    got: list[int] = []

    def receive() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(limit)
                n = 0
                while n < size and (chunk := conn.recv(1 << 16)):
                    n += len(chunk)
                got.append(n)
                conn.sendall(b"k")  # the sender's clock stops when all has arrived

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    with sender.socket() as s:
        s.settimeout(limit)
        start = time.monotonic()
        s.connect((receiver.ip, listener.getsockname()[1]))
        s.sendall(b"\0" * size)
        assert s.recv(1) == b"k"
        seconds = time.monotonic() - start
    thread.join(limit)
    listener.close()
    assert got == [size]
    return seconds


def test_throttled_link_is_slower_both_ways(bed: TestBed) -> None:
    a, b, _ = bed.hosts
    fast_out, fast_in = transfer_seconds(b, a), transfer_seconds(a, b)

    bed.throttle(1, rate="4mbit", burst="32kbit", latency="50ms")
    out = b.check_output(["tc", "qdisc", "show", "dev", "eth0"])
    assert "tbf" in out and "4Mbit" in out
    # 1 MiB at 4 Mbit/s takes 2.1 s at best.
    slow_out, slow_in = transfer_seconds(b, a), transfer_seconds(a, b)
    for fast, slow in ((fast_out, slow_out), (fast_in, slow_in)):
        assert slow > 1.6, (fast, slow)
        assert slow > 5 * fast, (fast, slow)
        assert slow < 20, (fast, slow)

    bed.unthrottle(1)
    bed.unthrottle(1)  # idempotent
    assert "tbf" not in b.check_output(["tc", "qdisc", "show", "dev", "eth0"])
    assert transfer_seconds(b, a) < slow_out / 3


# -- (d) teardown ---------------------------------------------------------------------


def test_teardown_leaves_nothing_even_when_the_body_raises(tmp_path: Path) -> None:
    skip_unless_available()
    before = root_network()
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), TestBed(2, tmp_path) as failed:
        run_id = failed.run_id
        worker = failed.start_worker(0, "w0", "teardown", tmp_path)
        wait_for(lambda: health(worker) == grpc.StatusCode.OK, 60, "the worker to answer")
        frozen = failed.host(1).run(["sleep", "300"])
        failed.freeze(frozen)
        # A process in a session of its own, as a runner is: only the namespace knows it.
        failed.host(1).run(["sh", "-c", "setsid sleep 301 & wait"])
        wait_until(lambda: len(failed.host(1).pids()) == 3, 10, "three processes in host 1")
        sockdir = failed._sockdir
        failed.host(0).socket()
        failed.throttle(0)
        failed.link_down(1)
        pids = failed.host(0).pids() + failed.host(1).pids()
        raise RuntimeError("the test failed")
    assert not [ns for ns in netns_names() if ns.startswith(run_id)]
    assert all(dead(pid) for pid in pids), [p for p in pids if not dead(p)]
    assert sockdir is not None and not sockdir.exists()
    assert root_network() == before


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    skip_unless_available()
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = f"{PREFIX}-{gone.pid}-beef-h0"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", leftover, "sleep", "300"])
    try:
        wait_until(lambda: netns_pids(leftover), 10, "the leftover's process")
        with TestBed(1) as bed:
            assert leftover not in netns_names()
            assert sleeper.wait(10) == -signal.SIGKILL
            assert bed.host(0).ip == f"{SUBNET}.1"
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)


def test_sigterm_tears_the_bed_down(tmp_path: Path) -> None:
    """CI's timeout sends SIGTERM: the bed still goes away."""
    skip_unless_available()
    script = (
        "import sys, time\n"
        "from testbed import TestBed\n"
        "with TestBed(2) as bed:\n"
        "    bed.host(1).run(['sleep', '300'])\n"
        "    print(bed.run_id, flush=True)\n"
        "    time.sleep(60)\n"  # bounded: the test signals long before
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        assert re.fullmatch(rf"{PREFIX}-\d+-[0-9a-f]+", run_id), child.stderr
        assert [ns for ns in netns_names() if ns.startswith(run_id)]
        child.send_signal(signal.SIGTERM)
        child.wait(30)
        assert not [ns for ns in netns_names() if ns.startswith(run_id)]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_skip_reason_names_what_is_missing() -> None:
    reason = unavailable_reason(("ip", "no-such-tool-here"))
    if os.geteuid() == 0 and sys.platform.startswith("linux"):
        assert "no-such-tool-here" in reason and ".ci/netns-deps.sh" in reason
    else:
        assert reason


def test_ports_are_per_host(bed: TestBed) -> None:
    """Each host has its own port space: the same port listens on every host at once."""
    listeners = []
    for host in bed.hosts:
        s = host.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", WORKER_PORT))
        s.listen(1)
        listeners.append(s)
    assert connects(bed.host(0), bed.host(2), WORKER_PORT)
