"""The CLI as a person uses it: one clear line and a non-zero exit on mistakes."""

from __future__ import annotations

import plistlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pomona.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pomona", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_unreachable_coordinator_is_one_line_and_non_zero() -> None:
    result = run("generate", "hello", "--coordinator", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach 127.0.0.1:1")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_coordinator_address_comes_from_the_environment() -> None:
    import os

    env = dict(os.environ, POMONA_COORDINATOR="127.0.0.1:2")
    result = run("nodes", env=env)
    assert result.returncode == 1
    assert "127.0.0.1:2" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "hi", "--coordinator", "nonsense"], "is not HOST:PORT"),
        (["coordinator", "--worker", "host-without-port"], "is not HOST:PORT"),
        (["coordinator", "--layers", "3,x"], "layers per worker"),
        (["up", "--local", "0"], "0 is not in the range"),
        (["coordinator", "--model-dir", "/no/such/folder"], "/no/such/folder is not a folder"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args: list[str], words: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert words in result.output


def test_deploy_files_start_the_worker() -> None:
    plist = plistlib.loads((ROOT / "deploy/launchd/org.pomona.worker.plist").read_bytes())
    assert plist["ProgramArguments"][1] == "worker"
    unit = (ROOT / "deploy/systemd/pomona-worker.service").read_text()
    assert "ExecStart=" in unit and "pomona worker" in unit


def test_a_reply_cut_off_by_a_coordinator_shutting_down_says_so() -> None:
    """grpc words it `Cancelling all calls`; the user reads what happened."""
    import asyncio

    from pomona import rpc
    from pomona.v1 import common_pb2, coordinator_pb2_grpc

    class Endless(coordinator_pb2_grpc.CoordinatorServicer):
        async def Generate(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            while True:
                yield common_pb2.GenerateChunk(tokens=[1], text=".")
                await asyncio.sleep(0.02)

    async def scenario() -> tuple[bytes, bytes, int | None]:
        server = rpc.aio_server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(Endless(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pomona", "generate", "hi", "--coordinator", f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.read(1), 30) == b"."
        await server.stop(grace=0.2)
        out, err = await asyncio.wait_for(client.communicate(), 30)
        return out, err, client.returncode

    out, err, code = asyncio.run(scenario())
    assert code == 1
    assert out.endswith(b"\n")  # the error starts a line of its own
    line = err.decode().strip().splitlines()[-1]
    assert "shut down while answering" in line and "Cancelling" not in line


@pytest.mark.cluster
def test_wrong_coordinator_ports_and_an_http_port_clash_are_named(tmp_path: Path) -> None:
    from clusterkit import describe, local_cluster, wait_for

    from pomona.local import free_port_pair

    http = free_port_pair(set())
    with local_cluster(tmp_path) as c:
        worker = c.worker("w0")
        coord = c.coordinator("pomona-demo", min_workers=2, http_port=http)
        wait_for(lambda: describe(worker), 60, "the worker")
        config = ["--config", str(coord.config)]
        wait_for(
            lambda: run("status", "--coordinator", coord.address, *config).returncode == 0,
            60,
            "the coordinator",
        )
        for command in (["status"], ["generate", "hi"], ["events"], ["nodes"]):
            result = run(*command, "--coordinator", worker.address, *config)
            assert result.returncode == 1
            assert result.stderr.strip().splitlines() == [
                f"Error: {worker.address} is a Pomona worker (w0 of cluster {c.cluster}), not "
                "the coordinator; the coordinator's gRPC API listens on its --port (50150 by "
                "default)"
            ], command
        result = run("status", "--coordinator", f"127.0.0.1:{http}", *config)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"Error: 127.0.0.1:{http} is the coordinator's HTTP API port "
            f"(http://127.0.0.1:{http}/v1), not its gRPC one;"
        ), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

        # A second coordinator whose HTTP port is taken: one line, no traceback.
        second = run(
            "coordinator", "--port", str(free_port_pair(c.taken)), "--host", "127.0.0.1",
            "--http-port", str(http), "--cluster", c.cluster, "--state-dir",
            str(tmp_path / "second"), *config,
        )  # fmt: skip
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"Error: port {http} is in use; pass --http-port with a free port (0: no HTTP API)"
        ]
