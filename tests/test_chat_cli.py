"""``pomona chat`` as a person pipes it: against a fake coordinator on loopback."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from pomona import rpc
from pomona.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

CHAT = [sys.executable, "-m", "pomona.chat"]


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Replies "echo <last message>"; "slow" streams dots until cancelled; "fail" fails."""

    def __init__(self) -> None:
        self.requests: list[common_pb2.GenerateRequest] = []
        self.streaming = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def ListNodes(  # noqa: N802
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListNodesReply:
        return coordinator_pb2.ListNodesReply(model="pomona-demo", serving=True)

    async def Generate(  # noqa: N802
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateChunk]:
        self.requests.append(request)
        last = request.messages[-1].content
        if last == "fail":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is too long")
        if last == "slow":
            self.streaming.set()
            try:
                while True:
                    yield common_pb2.GenerateChunk(tokens=[1], text=".")
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        yield common_pb2.GenerateChunk(tokens=[1], text="echo ")
        yield common_pb2.GenerateChunk(
            tokens=[2],
            text=last,
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2),
        )


def with_coordinator(scenario: Callable[[FakeCoordinator, str], Awaitable[None]]) -> None:
    async def main() -> None:
        fake = FakeCoordinator()
        server = rpc.aio_server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await scenario(fake, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


async def start_chat(address: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CHAT, "--coordinator", address, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def roles(request: common_pb2.GenerateRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


def test_history_is_sent_with_each_turn_and_reset_clears_it() -> None:
    async def scenario(fake: FakeCoordinator, address: str) -> None:
        chat = await start_chat(address, "--system", "Be kind.", "--max-tokens", "7")
        out, err = await asyncio.wait_for(chat.communicate(b"hello\n\nagain\n/reset\nthird\n"), 20)
        assert chat.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["echo hello", "echo again", "echo third"]
        first, second, third = fake.requests
        system = ("system", "Be kind.")
        assert roles(first) == [system, ("user", "hello")]
        assert roles(second) == [
            system,
            ("user", "hello"),
            ("assistant", "echo hello"),
            ("user", "again"),
        ]
        assert roles(third) == [system, ("user", "third")]
        assert first.max_tokens == 7
        assert not first.fit_max_tokens  # a number the user gave is kept, or refused

    with_coordinator(scenario)


def test_the_default_max_tokens_is_lowered_to_what_the_context_leaves() -> None:
    async def scenario(fake: FakeCoordinator, address: str) -> None:
        chat = await start_chat(address)
        out, err = await asyncio.wait_for(chat.communicate(b"hello\n"), 20)
        assert chat.returncode == 0, err.decode()
        (request,) = fake.requests
        assert request.max_tokens == 1024 and request.fit_max_tokens

    with_coordinator(scenario)


def test_ctrl_c_stops_the_reply_in_the_cluster_and_the_chat_goes_on() -> None:
    async def scenario(fake: FakeCoordinator, address: str) -> None:
        chat = await start_chat(address)
        assert chat.stdin is not None and chat.stdout is not None
        chat.stdin.write(b"slow\n")
        await chat.stdin.drain()
        assert await asyncio.wait_for(chat.stdout.read(1), 20) == b"."
        chat.send_signal(signal.SIGINT)
        await asyncio.wait_for(fake.cancelled.wait(), 5)
        out, err = await asyncio.wait_for(chat.communicate(b"hello\n/exit\nnever sent\n"), 20)
        assert chat.returncode == 0, err.decode()
        assert out.decode().splitlines()[-1] == "echo hello"
        assert "(stopped)" in err.decode()
        assert len(fake.requests) == 2
        # The stopped turn is not part of the conversation.
        assert roles(fake.requests[1]) == [("user", "hello")]

    with_coordinator(scenario)


def test_a_failed_turn_in_a_pipe_is_one_line_and_exit_1() -> None:
    async def scenario(fake: FakeCoordinator, address: str) -> None:
        chat = await start_chat(address)
        out, err = await asyncio.wait_for(chat.communicate(b"fail\nhello\n"), 20)
        assert chat.returncode == 1
        assert err.decode().strip().splitlines() == ["Error: the prompt is too long"]
        assert len(fake.requests) == 1

    with_coordinator(scenario)


def test_an_unreachable_coordinator_is_one_line_and_exit_1() -> None:
    result = subprocess.run(
        [*CHAT, "--coordinator", "127.0.0.1:1"],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach 127.0.0.1:1")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.cluster
def test_chat_with_the_demo_model_works_with_the_default_max_tokens(tmp_path: Path) -> None:
    """The demo model's context is 1024 tokens: a default of 1024 more must be lowered."""
    from clusterkit import local_cluster, wait_serving

    with local_cluster(tmp_path) as c:
        c.worker("w0")
        coord = c.coordinator("pomona-demo")
        wait_serving(coord)
        result = subprocess.run(
            [*CHAT, "--coordinator", coord.address, "--config", str(coord.config),
             "--temperature", "0"],
            input="Once upon a time\n", capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
