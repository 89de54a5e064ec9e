"""`pomona status --watch` in a real terminal (a pty) against a real gRPC server, and
`pomona status --json` / `pomona events` against the same server."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from click.testing import CliRunner

from pomona.coordinator.events import EventLog
from pomona.status_cmd import events_command, status_command
from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

GB = 10**9
# The child makes the pty its controlling terminal, so that Ctrl-C there is a SIGINT.
CHILD = (
    "import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "from pomona.status_cmd import status_command; status_command(sys.argv[1:])"
)


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers Status with figures that change at every call; Events from a real log."""

    def __init__(self) -> None:
        self.calls = 0
        self.log = EventLog()

    async def Status(  # noqa: N802
        self, request: coordinator_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.StatusReply:
        self.calls += 1
        reply = coordinator_pb2.StatusReply(
            cluster="lab", model="pomona-demo", serving=True, tokens_per_s=10.0 * self.calls + 0.5,
            ttft_s=0.25, requests_total=self.calls,
        )  # fmt: skip
        for i, name in enumerate(("mini-1", "mini-2")):
            status = reply.nodes.add(last_seen_s=0.2, heartbeat_rtt_s=0.001)
            status.node.node_id, status.node.name = f"id{i}", name
            status.node.state = coordinator_pb2.NODE_STATE_SERVING
            status.node.shard.start_layer, status.node.shard.end_layer = 4 * i, 4 * i + 4
            sample = status.sample
            sample.memory_total_bytes, sample.memory_used_bytes = 16 * GB, 9 * GB
            sample.cpu_percent = 20.0
        return reply

    async def Events(  # noqa: N802
        self, request: coordinator_pb2.EventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.Event]:
        async for event in self.log.stream(request.after, request.follow):
            yield event


@pytest.fixture
def coordinator() -> Iterator[tuple[FakeCoordinator, str]]:
    fake = FakeCoordinator()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-coordinator", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        fake.log.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class Terminal:
    """`pomona status --watch` on an 80x24 pty; `screen` is all it has written."""

    def __init__(self, address: str) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.settings_before = termios.tcgetattr(self.slave)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env["TERM"] = "xterm-256color"
        argv = ["--watch", "--interval", "0.3", "--coordinator", address]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *argv],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            env=env,
        )
        self.screen = b""

    def read(self, timeout_s: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if ready:
            try:
                self.screen += os.read(self.master, 65536)
            except OSError:  # the child has gone and the pty is drained
                time.sleep(timeout_s)

    def wait_for(self, pattern: bytes, count: int = 1, timeout_s: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = list(dict.fromkeys(re.findall(pattern, self.screen)))
            if len(found) >= count:
                return found
            assert self.proc.poll() is None, self.screen.decode(errors="replace")[-2000:]
            self.read(0.1)
        raise AssertionError(f"no {count} x {pattern!r} in {self.screen[-2000:]!r}")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_exit(self, timeout_s: float = 15.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.05)
        self.read(0.05)
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal(coordinator: tuple[FakeCoordinator, str]) -> Iterator[Terminal]:
    term = Terminal(coordinator[1])
    try:
        yield term
    finally:
        term.close()


def assert_started_and_refreshes(term: Terminal) -> None:
    term.wait_for(rb"mini-2")
    rates = term.wait_for(rb"(\d+\.5) tok/s", count=2)  # the figure changed on screen
    assert len(rates) >= 2
    assert b"q to quit" in term.screen and b"\x1b[?1049h" in term.screen  # full-screen


def assert_terminal_restored(term: Terminal) -> None:
    assert term.screen.rfind(b"\x1b[?1049l") > term.screen.rfind(b"\x1b[?1049h")
    assert term.screen.rfind(b"\x1b[?25h") > term.screen.rfind(b"\x1b[?25l")  # cursor back
    assert termios.tcgetattr(term.slave) == term.settings_before  # echo, line mode
    assert b"Traceback" not in term.screen


def test_live_view_refreshes_and_quits_on_q(terminal: Terminal) -> None:
    assert_started_and_refreshes(terminal)
    assert termios.tcgetattr(terminal.slave)[3] & termios.ICANON == 0  # cbreak while live
    terminal.type(b"q")
    assert terminal.wait_exit() == 0
    assert_terminal_restored(terminal)


def test_live_view_quits_cleanly_on_ctrl_c(terminal: Terminal) -> None:
    assert_started_and_refreshes(terminal)
    terminal.type(b"\x03")
    assert terminal.wait_exit() == 0
    assert_terminal_restored(terminal)


def test_live_view_survives_keys_it_does_not_know(terminal: Terminal) -> None:
    terminal.wait_for(rb"mini-2")
    terminal.type(b"x\x1b[A")
    seen = len(terminal.screen)
    terminal.wait_for(rb"(\d+\.5) tok/s", count=3)
    assert terminal.proc.poll() is None and len(terminal.screen) > seen
    terminal.type(b"Q")
    assert terminal.wait_exit() == 0


def test_status_json_has_the_schema(coordinator: tuple[FakeCoordinator, str]) -> None:
    result = CliRunner().invoke(status_command, ["--json", "--coordinator", coordinator[1]])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["schema"] == "pomona.status/v1"
    assert [n["node"]["name"] for n in doc["nodes"]] == ["mini-1", "mini-2"]
    assert doc["nodes"][0]["sample"]["memory_used_bytes"] == str(9 * GB)


def test_status_table_without_a_terminal(coordinator: tuple[FakeCoordinator, str]) -> None:
    result = CliRunner().invoke(status_command, ["--coordinator", coordinator[1]])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split()[:3] == ["node", "state", "layers"]
    assert "serving pomona-demo · 10.5 tok/s" in result.output


def test_unreachable_coordinator_is_one_line_and_exit_1() -> None:
    for command in (status_command, events_command):
        result = CliRunner().invoke(command, ["--coordinator", "127.0.0.1:1"])
        assert result.exit_code == 1
        assert result.output.startswith("Error: cannot reach 127.0.0.1:1")
        assert len(result.output.strip().splitlines()) == 1


def test_events_prints_one_line_per_event(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, address = coordinator
    fake.log.record("node_joined", "id0", "mini-1", "at 10.0.0.1:50151")
    fake.log.record("node_lost", "id1", "", "no telemetry for 5 s")
    result = CliRunner().invoke(events_command, ["--coordinator", address])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  node_joined +mini-1  at 10.0.0.1:50151", lines[0]
    )
    assert lines[1].endswith("node_lost       id1  no telemetry for 5 s")
    as_json = CliRunner().invoke(
        events_command, ["--json", "--after", "1", "--coordinator", address]
    )
    docs = [json.loads(line) for line in as_json.output.splitlines()]
    assert [(d["schema"], d["seq"], d["kind"]) for d in docs] == [
        ("pomona.event/v1", "2", "node_lost")
    ]


def test_events_follow_prints_new_events_and_stops_on_ctrl_c(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, address = coordinator
    fake.log.record("plan_changed", message="2 stages")
    code = "from pomona.status_cmd import events_command; import sys; events_command(sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--follow", "--coordinator", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "plan_changed" in proc.stdout.readline()
        fake.log.record("load_started", message="pomona-demo on 2 workers")
        assert "load_started" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_without_a_terminal_says_what_to_use(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    result = CliRunner().invoke(status_command, ["--watch", "--coordinator", coordinator[1]])
    assert result.exit_code == 1
    assert result.output == "Error: --watch needs a terminal; --watch --json streams JSON lines\n"
