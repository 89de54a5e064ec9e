"""A multi-host test bed: Linux network namespaces on one bridge.

``TestBed(n)`` builds n "hosts", each a network namespace with its own IPv4
address from 198.18.0.0/15 (the range set aside for network tests) on a veth
whose other end is a port of a Linux bridge. The bridge lives in a namespace
of its own, so the machine's real interfaces and routes are never touched.
Pomona workers and coordinators run inside the hosts exactly as on real
machines and find each other through real mDNS across the bridge.

``TestBed(n, fast_hosts=k)`` also joins hosts 0..k-1 by a second network, a
"thunderbolt" bridge: each of those hosts gets ``thunderbolt0`` with an address
from 198.19.0.0/24 (the other half of the /15), as two Macs cabled by
Thunderbolt have a network of their own beside the office's.

Faults: kill a process (group), freeze and thaw it (SIGSTOP / SIGCONT),
freeze a whole host, pull a host's cable (its bridge port down), and throttle
a host's link with ``tc … tbf`` in both directions; each on either network.

The test process itself stays in the root namespace. To reach a service in a
host it dials a Unix socket that relays each connection to ``ip:port`` from
inside a namespace (path-bound Unix sockets are not tied to a network
namespace); so clusterkit's helpers work unchanged on a ``BedProc``.

Everything is torn down on exit, failed test or not: processes (thawed first),
namespaces (which removes the veths), relays, sockets. Leftovers of a run
whose process died (SIGKILL) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clusterkit import Proc, cluster_config, seed_speed, spare_flag

PREFIX = "pbed"
NETNS_DIR = Path("/run/netns")
SUBNET = "198.18.0"  # host i is SUBNET.(i + 1)/24
PREFIX_LEN = 24
HOST_IF = "eth0"
BRIDGE = "br0"
FAST_SUBNET = "198.19.0"  # host i's second address (fast_hosts): FAST_SUBNET.(i + 1)/24
FAST_IF = "thunderbolt0"  # the name Linux's thunderbolt-net gives a Thunderbolt link
FAST_BRIDGE = "br1"
WORKER_PORT = 7000  # the MLX ring listens on WORKER_PORT + 1, a head runner on + 2
COORDINATOR_PORT = 7100
CLONE_NEWNET = 0x40000000
# pbed-<owner pid>-<hex>-<role>
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-(br|h\d+)$")


class BedError(RuntimeError):
    """An ip/tc command failed while building or changing the bed."""


# -- shell -------------------------------------------------------------------------


def _sh(*argv: str, check: bool = True, timeout: float = 30.0) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise BedError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns a truthy value, else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def netns_names() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


def netns_pids(ns: str) -> list[int]:
    out = _sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.split()]


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_netns(ns: str, timeout: float = 15.0) -> None:
    """Kill every process in ``ns`` (thawed first), then delete it."""
    if not (NETNS_DIR / ns).exists():
        return
    pids = netns_pids(ns)
    _signal_pids(pids, signal.SIGCONT)
    _signal_pids(pids, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not netns_pids(ns), timeout, f"the processes in {ns} to exit")
    _sh("ip", "netns", "del", ns, check=False)


def _add_veth(ns: str, peer: str, peer_ns: str, name: str = HOST_IF) -> None:
    """``name`` in ``ns`` paired with ``peer`` in ``peer_ns``, each made where it lives."""
    _sh("ip", "-n", ns, "link", "add", name, "type", "veth",
        "peer", "name", peer, "netns", peer_ns)  # fmt: skip


def remove_leftovers() -> list[str]:
    """Delete namespaces of earlier runs whose owning process is gone."""
    removed = []
    for ns in netns_names():
        m = _NAME.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            remove_netns(ns)
            removed.append(ns)
    return removed


# -- sockets inside a namespace ------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def netns_socket(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in network namespace ``ns``.

    A socket belongs to the namespace of the thread that created it, for its
    whole life; so a short-lived thread enters ``ns`` (setns affects only the
    calling thread), creates it and exits.
    """
    result: dict[str, Any] = {}

    def create() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
                result["sock"] = socket.socket(family, kind)
            finally:
                os.close(fd)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=create, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]


class Relay:
    """Unix socket → ``target`` (ip, port), dialled from inside namespace ``ns``.

    Relays only what its clients send, and stops when they hang up or the bed
    is torn down.
    """

    def __init__(self, path: Path, ns: str, target: tuple[str, int], connect_timeout: float = 5.0):
        self.path, self.ns, self.target = path, ns, target
        self.connect_timeout = connect_timeout
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        threading.Thread(target=self._accept, name=f"relay-{path.name}", daemon=True).start()

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    def _track(self, *socks: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._open.update(socks)
            return True

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connect, args=(conn,), daemon=True).start()

    def _connect(self, conn: socket.socket) -> None:
        try:
            upstream = netns_socket(self.ns)
        except OSError:
            self._drop(conn)
            return
        if not self._track(conn, upstream):
            self._drop(conn, upstream)
            return
        try:
            upstream.settimeout(self.connect_timeout)
            upstream.connect(self.target)
            upstream.settimeout(None)
        except OSError:
            self._drop(conn, upstream)  # the client sees its connection closed: UNAVAILABLE
            return
        done = threading.Semaphore(0)
        for src, dst in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pump, args=(src, dst, done), daemon=True).start()
        done.acquire()
        done.acquire()
        self._drop(conn, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            done.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._open)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# -- hosts and processes -----------------------------------------------------------


@dataclass
class Host:
    """One namespace on the bridge: a machine of the lab."""

    bed: TestBed
    index: int
    ns: str
    ip: str
    interface: str = HOST_IF
    fast_ip: str = ""  # its address on the "thunderbolt" network, "" when not on it
    fast_interface: str = FAST_IF

    @property
    def bridge_port(self) -> str:
        """This host's veth end in the bridge namespace."""
        return f"vh{self.index}"

    @property
    def fast_bridge_port(self) -> str:
        """This host's veth end on the fast bridge."""
        return f"vt{self.index}"

    def port_of(self, network: str) -> tuple[str, str]:
        """(its interface, its bridge port) on ``network``: "control" or "fast"."""
        if network == "control":
            return self.interface, self.bridge_port
        if network == "fast" and self.fast_ip:
            return self.fast_interface, self.fast_bridge_port
        raise ValueError(f"host {self.index} is not on a network named {network!r}")

    def interface_bytes(self, network: str = "control") -> int:
        """Bytes sent plus received so far on its interface on ``network``."""
        dev = self.port_of(network)[0]
        stats = json.loads(self.check_output(["ip", "-j", "-s", "link", "show", "dev", dev]))[0]
        return int(stats["stats64"]["rx"]["bytes"]) + int(stats["stats64"]["tx"]["bytes"])

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host, in its own process group."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        popen = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **popen_kwargs)
        self.bed._popens.append(popen)
        # Return once the child is inside: a fault injected right away then
        # hits a process of this host, not `ip` still in the root namespace.
        inside = os.stat(NETNS_DIR / self.ns).st_ino

        def entered() -> bool:
            try:
                return (
                    popen.poll() is not None
                    or os.stat(f"/proc/{popen.pid}/ns/net").st_ino == inside
                )
            except FileNotFoundError:
                return True

        wait_until(entered, 10, f"{argv[0]} to enter {self.ns}", interval=0.005)
        return popen

    def check_output(self, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> str:
        """Run ``argv`` inside this host to its end and return its stdout."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        return subprocess.check_output(
            ["ip", "netns", "exec", self.ns, *argv], timeout=timeout, **kwargs
        )

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of the test process that lives in this host (closed at teardown)."""
        s = netns_socket(self.ns, family, kind)
        self.bed._sockets.add(s)
        return s

    def dial(self, address: str) -> str:
        """A gRPC address for the test process that reaches ``ip:port`` from this host."""
        ip, _, port = address.rpartition(":")
        return self.bed._relay(self.ns, (ip, int(port)))

    def pids(self) -> list[int]:
        return netns_pids(self.ns)

    def ping(self, ip: str, count: int = 2, wait: float = 1.0, interval: float = 0.2) -> bool:
        """True when ``ip`` answers a ping from this host (``count`` pings at most, bounded)."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", f"{wait:g}", "-i", f"{interval:g}", ip]
        timeout = count * (wait + interval) + 5
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], capture_output=True, timeout=timeout
        )
        return done.returncode == 0


@dataclass
class BedProc(Proc):
    """A Pomona daemon on a host: a clusterkit ``Proc``, so its helpers work on it.

    ``grpc_address`` is what other hosts dial (``ip:port``); ``address`` is
    what the test process dials (a relay from the daemon's own host).
    """

    host: Host = field(kw_only=True)
    relay: str = field(kw_only=True)

    @property
    def address(self) -> str:
        return self.relay

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def grpc_address(self) -> str:
        return f"{self.host.ip}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        _stop_group(self.popen, sig, timeout)


def _stop_group(popen: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Thaw, signal, wait, then SIGKILL the process group of ``popen``."""
    for s in (signal.SIGCONT, sig):
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(5)


Target = BedProc | subprocess.Popen[Any] | int


def _pgid(target: Target) -> int:
    if isinstance(target, BedProc):
        return os.getpgid(target.popen.pid)
    if isinstance(target, int):
        return os.getpgid(target)
    return os.getpgid(target.pid)


# -- requirements ------------------------------------------------------------------

_reason: str | None = None


def unavailable_reason(tools: Sequence[str] = ("ip", "tc")) -> str:
    """Why the bed cannot be built here, or "" when it can."""
    global _reason
    if not sys.platform.startswith("linux"):
        return "the test bed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the test bed needs root (network namespaces, veths, tc)"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"the test bed needs {', '.join(missing)} (run .ci/netns-deps.sh)"
    if _reason is None:
        _reason = _probe()
    return _reason


def _probe() -> str:
    """Try a bridge, a veth and a tbf qdisc in throwaway namespaces."""
    run = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    br, h = f"{run}-br", f"{run}-h0"
    try:
        _sh("ip", "netns", "add", br)
        _sh("ip", "netns", "add", h)
        _sh("ip", "-n", br, "link", "add", BRIDGE, "type", "bridge")
        _add_veth(h, "vh0", br)
        _sh("ip", "-n", h, "link", "set", HOST_IF, "up")
        _sh("tc", "-n", h, "qdisc", "add", "dev", HOST_IF, "root", "tbf",
            "rate", "1mbit", "burst", "32kbit", "latency", "50ms")  # fmt: skip
    except (BedError, OSError, subprocess.SubprocessError) as e:
        return f"cannot build network namespaces here: {e}"
    finally:
        for ns in (h, br):
            _sh("ip", "netns", "del", ns, check=False)
    return ""


def skip_unless_available(tools: Sequence[str] = ("ip", "tc")) -> None:
    reason = unavailable_reason(tools)
    if reason:
        pytest.skip(reason)


# -- the bed -----------------------------------------------------------------------


@dataclass
class TestBed:
    """N hosts on one bridge. Use as a context manager (or ``bed_fixture``)."""

    __test__ = False  # not a pytest test class

    hosts_count: int = 3
    root: Path | None = None
    fast_hosts: int = 0  # hosts 0..fast_hosts-1 are also on the "thunderbolt" bridge
    run_id: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}")
    hosts: list[Host] = field(default_factory=list, init=False)
    procs: list[BedProc] = field(default_factory=list, init=False)
    _popens: list[subprocess.Popen[Any]] = field(default_factory=list, init=False)
    _relays: dict[tuple[str, str, int], Relay] = field(default_factory=dict, init=False)
    _sockets: weakref.WeakSet[socket.socket] = field(default_factory=weakref.WeakSet, init=False)
    _sockdir: Path | None = field(default=None, init=False)
    _own_root: bool = field(default=False, init=False)
    _old_sigterm: Any = field(default=None, init=False)
    _term_pending: bool = field(default=False, init=False)

    @property
    def bridge_ns(self) -> str:
        return f"{self.run_id}-br"

    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(h.ns for h in self.hosts)]

    def host(self, i: int) -> Host:
        return self.hosts[i]

    # -- building and tearing down -------------------------------------------------

    def __enter__(self) -> TestBed:
        if not 1 <= self.hosts_count <= 250:
            raise ValueError(f"a bed has 1 to 250 hosts, not {self.hosts_count}")
        if not 0 <= self.fast_hosts <= self.hosts_count:
            raise ValueError(f"fast_hosts must be 0 to {self.hosts_count}, not {self.fast_hosts}")
        self._catch_sigterm()
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        remove_leftovers()
        for ns in netns_names():  # idempotent: this run's names, should they exist
            if ns.startswith(self.run_id + "-"):
                remove_netns(ns)
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
            self._own_root = True
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        # Unix socket paths must stay under 108 bytes: keep them short.
        self._sockdir = Path(tempfile.mkdtemp(prefix=f"{self.run_id}-s", dir="/tmp"))
        br = self.bridge_ns
        _sh("ip", "netns", "add", br)
        _sh("ip", "-n", br, "link", "set", "lo", "up")
        # Without snooping the bridge floods all multicast, as a plain switch does.
        _sh("ip", "-n", br, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        _sh("ip", "-n", br, "link", "set", BRIDGE, "up")
        if self.fast_hosts:
            _sh("ip", "-n", br, "link", "add", FAST_BRIDGE, "type", "bridge")
            _sh("ip", "-n", br, "link", "set", FAST_BRIDGE, "up")
        for i in range(self.hosts_count):
            fast_ip = f"{FAST_SUBNET}.{i + 1}" if i < self.fast_hosts else ""
            host = Host(self, i, f"{self.run_id}-h{i}", f"{SUBNET}.{i + 1}", fast_ip=fast_ip)
            self.hosts.append(host)
            self._add_host(host)
        for host in self.hosts:
            self._wait_link(host, up=True)
            if host.fast_ip:
                self._wait_link(host, up=True, network="fast")

    def _add_host(self, host: Host) -> None:
        ns, br, port = host.ns, self.bridge_ns, host.bridge_port
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Both ends are created inside the namespaces: nothing appears in the root one.
        _add_veth(ns, port, br)
        _sh("ip", "-n", br, "link", "set", port, "master", BRIDGE)
        _sh("ip", "-n", br, "link", "set", port, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{host.ip}/{PREFIX_LEN}", "dev", HOST_IF)
        _sh("ip", "-n", ns, "link", "set", HOST_IF, "multicast", "on", "up")
        _sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", HOST_IF)
        if host.fast_ip:
            dev, port = host.fast_interface, host.fast_bridge_port
            _add_veth(ns, port, br, name=dev)
            _sh("ip", "-n", br, "link", "set", port, "master", FAST_BRIDGE)
            _sh("ip", "-n", br, "link", "set", port, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{host.fast_ip}/{PREFIX_LEN}", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")

    def _operstate(self, ns: str, dev: str) -> str:
        out = _sh("ip", "-n", ns, "-j", "link", "show", "dev", dev, check=False)
        try:
            return str(json.loads(out)[0].get("operstate", ""))
        except (ValueError, IndexError):
            return ""

    def _wait_link(
        self, host: Host, up: bool, timeout: float = 15.0, network: str = "control"
    ) -> None:
        dev, port = host.port_of(network)

        def ready() -> bool:
            states = (self._operstate(host.ns, dev), self._operstate(self.bridge_ns, port))
            return all(s == "UP" for s in states) if up else states[0] != "UP"

        what = f"{host.ns}'s {network} link to be {'up' if up else 'down'}"
        wait_until(ready, timeout, what)

    def teardown(self) -> None:
        """Stop every process, close every relay and socket, delete the namespaces."""
        self._defer_sigterm()
        try:
            for popen in self._popens:  # thaw first: a stopped process acts on no signal but KILL
                if popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(popen.pid, signal.SIGCONT)
            for ns in self.namespaces():
                _signal_pids(netns_pids(ns), signal.SIGCONT)
            for popen in self._popens:
                if popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            for popen in self._popens:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(max(0.1, deadline - time.monotonic()))
            for popen in self._popens:
                _stop_group(popen, signal.SIGKILL, 5.0)
            for relay in self._relays.values():
                relay.close()
            self._relays.clear()
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.close()
            # Runners and anything else started inside, in whatever session.
            for ns in self.namespaces():
                remove_netns(ns)
            if self._sockdir is not None:
                shutil.rmtree(self._sockdir, ignore_errors=True)
            if self._own_root and self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
        finally:
            self._restore_sigterm()

    def _catch_sigterm(self) -> None:
        """Turn SIGTERM (CI's timeout) into KeyboardInterrupt so teardown runs."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_term(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        self._old_sigterm = signal.signal(signal.SIGTERM, on_term)

    def _defer_sigterm(self) -> None:
        """While tearing down, note a SIGTERM instead of interrupting the teardown."""
        if self._old_sigterm is None or threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum: int, frame: object) -> None:
            self._term_pending = True

        signal.signal(signal.SIGTERM, on_term)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is None or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._old_sigterm)
        self._old_sigterm = None
        if self._term_pending:  # deliver it now that everything is gone
            os.kill(os.getpid(), signal.SIGTERM)

    def _relay(self, ns: str, target: tuple[str, int]) -> str:
        key = (ns, *target)
        if key not in self._relays:
            assert self._sockdir is not None, "the bed is not set up"
            path = self._sockdir / f"{len(self._relays)}.sock"
            self._relays[key] = Relay(path, ns, target)
        return self._relays[key].address

    # -- faults ----------------------------------------------------------------------

    def kill(self, target: Target, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group of ``target`` (a BedProc, Popen or pid).

        A runner is its own group leader: pass its pid (the worker's Describe
        reports it as ``shard.runner_pid``). A frozen process acts on nothing
        but SIGKILL until thawed.
        """
        os.killpg(_pgid(target), sig)

    def freeze(self, target: Target) -> None:
        """SIGSTOP the process group of ``target``: a hung process."""
        os.killpg(_pgid(target), signal.SIGSTOP)

    def thaw(self, target: Target) -> None:
        os.killpg(_pgid(target), signal.SIGCONT)

    def freeze_host(self, i: int) -> list[int]:
        """SIGSTOP every process inside host ``i`` (a Mac gone to sleep)."""
        pids = self.hosts[i].pids()
        _signal_pids(pids, signal.SIGSTOP)
        return pids

    def thaw_host(self, i: int) -> None:
        _signal_pids(self.hosts[i].pids(), signal.SIGCONT)

    def link_down(self, i: int, network: str = "control") -> None:
        """Pull host ``i``'s cable: its bridge port goes down (the host sees no carrier)."""
        host = self.hosts[i]
        _sh("ip", "-n", self.bridge_ns, "link", "set", host.port_of(network)[1], "down")
        self._wait_link(host, up=False, network=network)

    def link_up(self, i: int, network: str = "control") -> None:
        host = self.hosts[i]
        _sh("ip", "-n", self.bridge_ns, "link", "set", host.port_of(network)[1], "up")
        self._wait_link(host, up=True, network=network)

    def interface_down(self, i: int, network: str = "control") -> None:
        """``ip link set <interface> down`` inside host ``i``: the host takes the link down
        itself (its address stays, its routes over the link go)."""
        host = self.hosts[i]
        _sh("ip", "-n", host.ns, "link", "set", host.port_of(network)[0], "down")
        self._wait_link(host, up=False, network=network)

    def throttle(
        self,
        i: int,
        rate: str = "1mbit",
        burst: str = "32kbit",
        latency: str = "50ms",
        network: str = "control",
    ) -> None:
        """Shape host ``i``'s link both ways with a token bucket (tc tbf)."""
        host = self.hosts[i]
        dev, port = host.port_of(network)
        args = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
        _sh("tc", "-n", host.ns, "qdisc", "replace", "dev", dev, *args)  # host → bridge
        _sh("tc", "-n", self.bridge_ns, "qdisc", "replace", "dev", port, *args)

    def unthrottle(self, i: int, network: str = "control") -> None:
        host = self.hosts[i]
        interface, port = host.port_of(network)
        for ns, dev in ((host.ns, interface), (self.bridge_ns, port)):
            if "tbf" in _sh("tc", "-n", ns, "qdisc", "show", "dev", dev, check=False):
                _sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")

    # -- Pomona ------------------------------------------------------------------------

    def _spawn(self, i: int, name: str, args: list[str], port: int, cluster: str) -> BedProc:
        host = self.hosts[i]
        assert self.root is not None
        log = self.root / "logs" / f"{name}.log"
        config = cluster_config(self.root, cluster)
        argv = [sys.executable, "-m", "pomona", "-v", *args, "--config", str(config)]
        with log.open("ab") as f:
            popen = host.run(argv, stdout=f, stderr=f)
        relay = host.dial(f"{host.ip}:{port}")
        proc = BedProc(name, popen, log, port, config, host=host, relay=relay)
        self.procs.append(proc)
        return proc

    def start_worker(
        self,
        i: int,
        name: str,
        cluster: str,
        model_dir: Path,
        state_dir: Path | None = None,
        *,
        port: int = WORKER_PORT,
        pin_address: bool = True,
        extra: Sequence[str] = (),
    ) -> BedProc:
        """``pomona worker`` on host ``i``.

        ``pin_address``: listen, advertise and speak mDNS on the host's bed
        address only; False leaves all three to the worker, as on a Mac.
        """
        assert self.root is not None
        ip = self.hosts[i].ip
        state_dir = state_dir or self.root / f"state-{name}"
        seed_speed(state_dir)
        pinned = ["--host", ip, "--address", ip, "--mdns-interface", ip] if pin_address else []
        args = [
            "worker", "--port", str(port), "--name", name, "--cluster", cluster, *pinned,
            "--state-dir", str(state_dir), "--model-dir", str(model_dir),
            *spare_flag(extra), *extra,
        ]  # fmt: skip
        return self._spawn(i, f"worker-{name}", args, port, cluster)

    def start_coordinator(
        self,
        i: int,
        model: str | Path,
        cluster: str,
        min_workers: int,
        *,
        layers: str = "",
        port: int = COORDINATOR_PORT,
        pin_address: bool = True,
        name: str = "coordinator",
        extra: Sequence[str] = (),
    ) -> BedProc:
        """``pomona coordinator`` on host ``i`` (``pin_address`` as for a worker)."""
        ip = self.hosts[i].ip
        pinned = ["--host", ip, "--mdns-interface", ip] if pin_address else []
        args = [
            "coordinator", "--port", str(port), "--model", str(model), "--cluster", cluster,
            "--min-workers", str(min_workers), *pinned, *extra,
        ]  # fmt: skip
        if layers:
            args += ["--layers", layers]
        return self._spawn(i, name, args, port, cluster)

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} on {p.host.ns}\n{p.tail(lines)}" for p in self.procs)


@contextlib.contextmanager
def open_bed(hosts: int = 3, root: Path | None = None, fast_hosts: int = 0) -> Iterator[TestBed]:
    """A bed that prints its daemons' logs when the body fails."""
    skip_unless_available()
    with TestBed(hosts, root, fast_hosts=fast_hosts) as bed:
        try:
            yield bed
        except BaseException:
            print(bed.logs())
            raise


def bed_fixture(hosts: int = 3, scope: str = "function", fast_hosts: int = 0) -> Any:
    """A pytest fixture giving a ``TestBed`` of ``hosts`` hosts, torn down after use.

    In a test module: ``bed = bed_fixture(3)`` then ``def test_x(bed): ...``.
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _bed(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[TestBed]:
        failed = request.session.testsfailed
        with open_bed(hosts, tmp_path_factory.mktemp("bed"), fast_hosts) as bed:
            yield bed
            if request.session.testsfailed > failed:  # shown under the failure
                print(bed.logs())

    return _bed
