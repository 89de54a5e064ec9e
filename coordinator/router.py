"""The cluster's one request path, shared by the gRPC and HTTP APIs.

A request is checked against the cluster's state and relayed to the head
runner; chunks stream back as they come. Failures leave as exceptions with a
gRPC status (``code()``) and a message (``details()``), whichever API the
request came in through.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from pomona import rpc
from pomona.coordinator import events as ev
from pomona.coordinator.cluster import Cluster
from pomona.tokens import runner_target
from pomona.v1 import common_pb2, runner_pb2_grpc

MAX_REQUEST_ID = 128
# How a head runner's call ends when the pipeline under it broke.
_PIPELINE_FAILURES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
     grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}
)  # fmt: skip


class GenerateError(Exception):
    """A request refused by the coordinator itself, shaped like a gRPC error."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


def _request_fault(e: grpc.aio.AioRpcError) -> bool:
    """Whether the head runner ended this request alone, the pipeline unharmed."""
    return any(key == rpc.REQUEST_FAULT for key, _ in (e.trailing_metadata() or ()))


class Router:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

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
        head = runner_target(serving.assignments[0].node_id, serving.load_id)
        return runner_pb2_grpc.RunnerStub(self.cluster.channel(serving.head_address, head))

    async def generate(
        self, request: common_pb2.GenerateRequest
    ) -> AsyncIterator[common_pb2.GenerateChunk]:
        """Stream the chunks of one generation; closing the iterator cancels it.

        When the pipeline breaks before any token was sent, the request waits
        for the pipeline to re-form and runs again; after a token was sent it
        ends with an error that says why (never a silent, normal-looking end).
        """
        if len(request.request_id) > MAX_REQUEST_ID:
            raise GenerateError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id is over {MAX_REQUEST_ID} characters",
            )
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        config = self.cluster.config
        sent = 0
        while True:
            if self.cluster.serving is None and self.cluster.reforming:
                await self.cluster.wait_serving("", config.retry_timeout)
            serving = self.cluster.serving
            load_id = serving.load_id if serving is not None else ""
            call = self._head().Generate(request, timeout=rpc.GENERATE_TIMEOUT)
            try:
                async for chunk in call:
                    sent += len(chunk.tokens) or 1
                    yield chunk
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in _PIPELINE_FAILURES:
                    raise
                if _request_fault(e):
                    self._record(ev.REQUEST_FAILED, request, e.details() or "")
                    raise GenerateError(
                        grpc.StatusCode.INTERNAL, f"the request failed: {e.details()}"
                    ) from e
                error = e
            finally:
                call.cancel()
            why = await self._why_broken(load_id)
            if not why:
                # The pipeline still serves: this request failed on its own.
                message = error.details() or error.code().name
                self._record(ev.REQUEST_FAILED, request, message)
                raise GenerateError(
                    grpc.StatusCode.INTERNAL, f"the request failed: {message}"
                ) from error
            if sent:
                self._record(ev.REQUEST_FAILED, request, f"after {sent} tokens: {why}")
                raise GenerateError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the generation was cut off after {sent} tokens because the pipeline broke: "
                    f"{why}; send the request again",
                )
            # No token was sent: the request runs again once the pipeline has
            # re-formed, however long the failed attempt had waited.
            started = time.monotonic()
            if await self.cluster.wait_serving(load_id, config.retry_timeout) is None:
                waited = time.monotonic() - started
                self._record(ev.REQUEST_FAILED, request, f"not retried: {why}")
                raise GenerateError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the pipeline broke ({why}) and has not re-formed after {waited:.0f} s: "
                    f"{self.cluster.problem}",
                )
            self._record(ev.REQUEST_RETRIED, request, why)

    async def _why_broken(self, load_id: str) -> str:
        """What broke the pipeline of ``load_id``; "" if it still serves.

        The coordinator learns of a failure from heartbeats and runner
        reports within about a heartbeat timeout; a pipeline still serving
        the same load after that did not break.
        """
        wait = self.cluster.config.heartbeat_timeout + 3.0
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            serving = self.cluster.serving
            if serving is None or serving.load_id != load_id:
                return self.cluster.failure or "the pipeline was re-formed"
            await asyncio.sleep(0.1)
        return ""

    def _record(self, kind: str, request: common_pb2.GenerateRequest, message: str) -> None:
        self.cluster.monitor.events.record(kind, message=f"request {request.request_id}: {message}")
