"""Link probes: RTT and bandwidth between two workers over one address pair.

The coordinator measures the link from worker A to worker B at one of B's addresses in
two signed calls: ``LinkListen`` on B opens a one-shot TCP sink on that address and
returns its port and a random ticket; ``LinkProbe`` on A connects there, presents the
ticket (the sink serves nobody else: the ticket only ever travels in signed calls),
times a few one-byte round trips, then sends a bounded number of bytes. The sink times
what arrives after a warm-up (the first tenth of the time: TCP's slow start, a shaper's
burst) and sends the rate back. The prober sends for a fixed time (or until a byte
bound), so that a scheduling hiccup of a busy machine is a small share of the window.

Bounded on both sides: the sink accepts one connection within ``ACCEPT_S``, takes at
most ``MAX_BYTES`` and lives at most ``SINK_S``; the prober gives up after its timeout
and stops sending when its send time is up (the sink then rates what arrived).

Wire format, prober to sink: ticket (32 bytes); ``pings`` times b"p", each echoed;
b"d" and the byte count (8 bytes, big-endian); the bytes. Sink to prober, at the end:
the rate in bytes/s (double) and the bytes received (8 bytes).
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass

TICKET_BYTES = 32
MAX_BYTES = 64 << 20  # the most a probe may send
MAX_PINGS = 100
MAX_TIMEOUT_S = 30.0
ACCEPT_S = 10.0  # the sink waits this long for its one connection
SINK_S = 30.0  # and lives at most this long in all
CHUNK = 256 << 10
WARMUP = 0.1  # the first tenth of the receiving time is not timed
_RESULT = struct.Struct("!dQ")
_COUNT = struct.Struct("!Q")


class LinkProbeError(ValueError):
    """A probe request that cannot be served; the message says why."""


@dataclass(frozen=True)
class ProbeResult:
    rtt_ms: float
    bandwidth_bytes_per_s: float
    bytes: int


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the probe connection")
        data += chunk
    return bytes(data)


class LinkSink:
    """A one-shot TCP sink on ``host`` (an address of this machine), in a thread."""

    def __init__(self, host: str, max_bytes: int = MAX_BYTES) -> None:
        self.ticket = secrets.token_bytes(TICKET_BYTES)
        self.max_bytes = min(max_bytes or MAX_BYTES, MAX_BYTES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((host, 0))
        except OSError as e:
            self._listener.close()
            raise LinkProbeError(
                f"cannot listen on {host}: {e.strerror or e} (not an address of this machine?)"
            ) from e
        self._listener.listen(1)
        self._listener.settimeout(ACCEPT_S)
        self.port: int = self._listener.getsockname()[1]
        self._deadline = time.monotonic() + SINK_S
        self._thread = threading.Thread(target=self._serve, name=f"link-sink-{self.port}")
        self._thread.daemon = True
        self._thread.start()

    def _serve(self) -> None:
        try:
            while time.monotonic() < self._deadline:
                try:
                    conn, _ = self._listener.accept()
                except OSError:  # timed out or closed: nobody came
                    return
                with conn:
                    if self._serve_one(conn):
                        return
        finally:
            self._listener.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        """Serve one connection; True once a caller with the ticket was served."""
        conn.settimeout(max(0.1, self._deadline - time.monotonic()))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if not hmac.compare_digest(_recv_exactly(conn, TICKET_BYTES), self.ticket):
                return False  # someone else: keep waiting for the prober
            while True:
                kind = _recv_exactly(conn, 1)
                if kind == b"p":
                    conn.sendall(b"p")
                elif kind == b"d":
                    break
                else:
                    return True
            (count,) = _COUNT.unpack(_recv_exactly(conn, _COUNT.size))
            rate, got = self._sink(conn, min(count, self.max_bytes))
            conn.sendall(_RESULT.pack(rate, got))
        except OSError:
            pass
        return True

    def _sink(self, conn: socket.socket, count: int) -> tuple[float, int]:
        got = 0
        samples: list[tuple[float, int]] = []  # (time, bytes so far) after each receive
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while got < count:
            n = conn.recv_into(view, min(CHUNK, count - got))
            if not n:
                break  # the prober's time was up
            got += n
            samples.append((time.perf_counter(), got))
        return received_rate(samples), got

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()


def received_rate(samples: list[tuple[float, int]]) -> float:
    """Bytes/s over (time, bytes so far) samples, leaving out the first tenth of the time
    (all of it when fewer than two samples come after)."""
    if len(samples) < 2:
        return 0.0
    first, last = samples[0], samples[-1]
    cut = first[0] + WARMUP * (last[0] - first[0])
    start = next((s for s in samples if s[0] >= cut), first)
    if last[0] <= start[0]:
        start = first
    if last[0] <= start[0]:
        return 0.0
    return (last[1] - start[1]) / (last[0] - start[0])


def probe(
    host: str,
    port: int,
    ticket: bytes,
    nbytes: int,
    pings: int,
    timeout_s: float,
    send_s: float = 0.0,
) -> ProbeResult:
    """Connect to a sink and measure; raises OSError/ConnectionError when it cannot."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=min(timeout_s, 2.0)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(ticket)
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            sock.sendall(b"p")
            _recv_exactly(sock, 1)
            rtts.append(time.perf_counter() - t)
        sock.sendall(b"d" + _COUNT.pack(nbytes))
        # Send for send_s, and leave a quarter of the time for the sink to answer.
        send_until = deadline - timeout_s / 4
        if send_s > 0:
            send_until = min(send_until, time.monotonic() + send_s)
        payload = memoryview(bytes(CHUNK))
        sent = 0
        while sent < nbytes and time.monotonic() < send_until:
            n = min(CHUNK, nbytes - sent)
            sock.settimeout(max(0.1, send_until - time.monotonic()))
            try:
                sock.sendall(payload[:n])
            except TimeoutError:
                break
            sent += n
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        rate, got = _RESULT.unpack(_recv_exactly(sock, _RESULT.size))
    return ProbeResult(
        rtt_ms=statistics.median(rtts) * 1e3 if rtts else 0.0,
        bandwidth_bytes_per_s=rate,
        bytes=got,
    )


def check_probe_request(
    host: str,
    port: int,
    ticket: bytes,
    nbytes: int,
    pings: int,
    timeout_s: float,
    send_s: float = 0.0,
) -> None:
    """Raise LinkProbeError naming what is wrong with a LinkProbe request."""
    if not host:
        raise LinkProbeError("host is empty: give the peer's address")
    if not 0 < port < 65536:
        raise LinkProbeError(f"port {port} is not a TCP port (1-65535)")
    if len(ticket) != TICKET_BYTES:
        raise LinkProbeError(f"the ticket must be the {TICKET_BYTES} bytes LinkListen gave")
    if not 0 < nbytes <= MAX_BYTES:
        raise LinkProbeError(f"bytes must be 1 to {MAX_BYTES}, got {nbytes}")
    if not 0 <= pings <= MAX_PINGS:
        raise LinkProbeError(f"pings must be 0 to {MAX_PINGS}, got {pings}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise LinkProbeError(f"timeout_s must be above 0 and at most {MAX_TIMEOUT_S:g}")
    if not 0 <= send_s < timeout_s:
        raise LinkProbeError("send_s must be 0 or more and less than timeout_s")
