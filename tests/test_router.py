"""The request path's judgement: a broken pipeline, or one request that failed.

The head runner here is a real gRPC server that fails calls the way a real
one does; the coordinator's view of the cluster is a real ``Cluster`` whose
pipeline is set by hand.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

import grpc
import pytest

from pomona import rpc
from pomona.config import CoordinatorConfig
from pomona.coordinator.cluster import Cluster, Serving
from pomona.coordinator.placement import Assignment
from pomona.coordinator.router import GenerateError, Router
from pomona.v1 import common_pb2, runner_pb2_grpc


class FailingHead(runner_pb2_grpc.RunnerServicer):
    def __init__(self, request_fault: bool):
        self.request_fault = request_fault
        self.calls = 0

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self.calls += 1
        if self.request_fault:
            context.set_trailing_metadata(((rpc.REQUEST_FAULT, "1"),))
            context.abort(grpc.StatusCode.INTERNAL, "KeyError: 'bad token'")
        context.abort(grpc.StatusCode.UNKNOWN, "Exception calling application")
        yield  # pragma: no cover


def _serve(head: FailingHead) -> tuple[grpc.Server, str]:
    server = rpc.server(futures.ThreadPoolExecutor(max_workers=4))
    runner_pb2_grpc.add_RunnerServicer_to_server(head, server)
    port = rpc.add_port(server, "127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


async def _generate(head: FailingHead) -> GenerateError:
    server, address = _serve(head)
    try:
        cluster = Cluster(CoordinatorConfig(heartbeat_timeout=0.5, retry_timeout=5.0))
        head_stage = Assignment("0123456789ab", "w0", 0, 4, 0)
        cluster.serving = Serving("load-1", address, (head_stage,), 512)
        request = common_pb2.GenerateRequest(prompt="hi", max_tokens=4)
        with pytest.raises(GenerateError) as caught:
            async for _ in Router(cluster).generate(request):
                pass
        kinds = [e.kind for e in cluster.monitor.events.since()]
        assert "request_failed" in kinds and "pipeline_failed" not in kinds
        return caught.value
    finally:
        server.stop(0)


def test_a_request_the_head_ended_alone_fails_with_its_own_message() -> None:
    head = FailingHead(request_fault=True)
    error = asyncio.run(_generate(head))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "KeyError: 'bad token'" in error.details()
    assert "pipeline" not in error.details()
    assert head.calls == 1  # not retried


def test_an_error_while_the_pipeline_still_serves_is_the_requests_own() -> None:
    head = FailingHead(request_fault=False)
    error = asyncio.run(_generate(head))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "the request failed" in error.details() and "broke" not in error.details()
