"""The cluster's one request path, shared by the gRPC and HTTP APIs.

A request is checked against the cluster's state and relayed to the head
runner; chunks stream back as they come. Failures leave as exceptions with a
gRPC status (``code()``) and a message (``details()``), whichever API the
request came in through.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from pomona import rpc
from pomona.coordinator.cluster import Cluster
from pomona.v1 import common_pb2, runner_pb2_grpc

MAX_REQUEST_ID = 128


class GenerateError(Exception):
    """A request refused by the coordinator itself, shaped like a gRPC error."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


class Router:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._channels: dict[str, grpc.aio.Channel] = {}

    def model_name(self) -> str:
        """The model being served, or "" when none is."""
        return self.cluster.config.model if self.cluster.serving is not None else ""

    def _head(self) -> runner_pb2_grpc.RunnerStub:
        serving = self.cluster.serving
        if serving is None:
            raise GenerateError(
                grpc.StatusCode.UNAVAILABLE,
                f"the cluster is not serving {self.cluster.config.model}: {self.cluster.problem}",
            )
        address = serving.head_address
        if address not in self._channels:
            self._channels[address] = rpc.aio_channel(address)
        return runner_pb2_grpc.RunnerStub(self._channels[address])

    async def generate(
        self, request: common_pb2.GenerateRequest
    ) -> AsyncIterator[common_pb2.GenerateChunk]:
        """Stream the chunks of one generation; closing the iterator cancels it."""
        if len(request.request_id) > MAX_REQUEST_ID:
            raise GenerateError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id is over {MAX_REQUEST_ID} characters",
            )
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        call = self._head().Generate(request, timeout=rpc.GENERATE_TIMEOUT)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
