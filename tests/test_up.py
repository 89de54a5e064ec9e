"""`pomona up --local 2` then `pomona generate`, as the README has a new user do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from clusterkit import seed_speed, wait_for

from pomona import rpc
from pomona.local import free_port_pair
from pomona.security import Auth
from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.cluster

TOOK_SPARE = "(a spare) took the load"


def worker_logs(home: Path, n: int) -> list[Path]:
    return [
        home / "state" / "pomona" / "local" / "logs" / f"worker-{i}.log" for i in range(1, n + 1)
    ]


def test_up_then_generate_then_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    port, http = free_port_pair(set()), free_port_pair(set())
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path))
    for i in range(1, 2 + 1):
        seed_speed(tmp_path / "state" / "pomona" / "local" / f"worker-{i}")
    up = subprocess.Popen(
        [sys.executable, "-m", "pomona", "up", "--local", "2", "--port", str(port),
         "--http-port", str(http)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert line.startswith(f"Pomona is up: coordinator 127.0.0.1:{port}"), line + (
            up.stderr.read() if up.poll() is not None and up.stderr else ""
        )
        assert "2 workers" in line and "pomona-demo" in line
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 5  # 2 workers, 2 runners, the coordinator
        result = subprocess.run(
            [sys.executable, "-m", "pomona", "generate", "The lab has", "--max-tokens", "24"],
            capture_output=True, text=True, timeout=120,
            env=dict(env, POMONA_COORDINATOR=f"127.0.0.1:{port}"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        words = result.stdout.split()
        assert len(words) >= 5 and all(w.isprintable() for w in words)
        # Each worker's runner was its spare, its imports done ahead of the load.
        assert all(TOOK_SPARE in log.read_text() for log in worker_logs(tmp_path, 2))
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    psutil.wait_procs(children, timeout=30)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_with_three_keeps_serving_when_workers_die_even_unread(tmp_path: Path) -> None:
    """Three local workers serve (they hung every request before), and survive losses,
    the second after nobody reads `up`'s output any more (`| head`, a harness that
    stopped reading): writing its report then ended `up`, and so the whole cluster."""
    port, http = free_port_pair(set()), free_port_pair(set())
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path))
    client_env = dict(env, POMONA_COORDINATOR=f"127.0.0.1:{port}")
    for i in range(1, 3 + 1):
        seed_speed(tmp_path / "state" / "pomona" / "local" / f"worker-{i}")
    up = subprocess.Popen(
        [sys.executable, "-m", "pomona", "up", "--local", "3", "--port", str(port),
         "--http-port", str(http)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip

    def generate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pomona", "generate", "hi", "--max-tokens", "3"],
            capture_output=True, text=True, timeout=120, env=client_env,
        )  # fmt: skip

    try:
        assert up.stdout is not None and up.stderr is not None
        line = up.stdout.readline()
        assert "3 workers" in line, line + (up.stderr.read() if up.poll() is not None else "")
        first = generate()
        assert first.returncode == 0 and first.stdout.strip(), first.stderr
        workers = [p for p in psutil.Process(up.pid).children() if p.cmdline()[3:4] == ["worker"]]
        assert len(workers) == 3
        workers[-1].kill()
        lines: list[str] = []
        while not any(x.startswith("serving on 2 workers") for x in lines):
            assert up.poll() is None, "pomona up exited when one worker died"
            lines.append(up.stderr.readline().strip())
        assert any(
            x.startswith("worker-3 (node local-3) exited with code -9 (SIGKILL)")
            and "on the 2 workers left (it is not restarted)" in x
            for x in lines
        ), lines
        again = generate()
        assert again.returncode == 0 and again.stdout.strip(), again.stderr
        assert up.poll() is None
        # The survivors re-formed with spares started once their first runners were up.
        took = [log.read_text().count(TOOK_SPARE) for log in worker_logs(tmp_path, 3)]
        assert sorted(took) == [1, 2, 2], took

        up.stdout.close()
        up.stderr.close()
        workers[0].kill()
        config = tmp_path / "state" / "pomona" / "local" / "cluster.json"
        channel = rpc.channel(f"127.0.0.1:{port}", Auth.load(config))
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        def serving_on_one() -> bool:
            assert up.poll() is None, "pomona up exited when a worker died, its output unread"
            reply = stub.Status(coordinator_pb2.StatusRequest(), timeout=5)
            return reply.serving and [p.name for p in reply.plan] == ["local-2"]

        wait_for(serving_on_one, 120, "the cluster to serve on local-2 alone")
        last = generate()
        assert last.returncode == 0 and last.stdout.strip(), last.stderr
        assert up.poll() is None
        channel.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
