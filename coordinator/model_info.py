"""What the serving model is, for the Status reply: asked of a stage once per load.

The cluster inspects the model before it plans but does not keep the answer; clients
(`pomona bench`) need its vocabulary and profile. One InspectModel call to a serving
worker per load, in the background: a slow worker never holds up a Status reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc

from pomona import rpc
from pomona.v1 import worker_pb2

if TYPE_CHECKING:
    from pomona.coordinator.cluster import Cluster

log = logging.getLogger(__name__)

# How long a Status reply waits for an answer it does not have yet.
STATUS_WAIT_S = 2.0


class ModelInfoCache:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._load_id = ""
        self._info: worker_pb2.ModelInfo | None = None
        self._task: asyncio.Task[worker_pb2.ModelInfo | None] | None = None

    def current(self) -> worker_pb2.ModelInfo | None:
        """The serving load's model info, if known (no waiting)."""
        serving = self._cluster.serving
        if serving is None or serving.load_id != self._load_id:
            return None
        return self._info

    async def get(self) -> worker_pb2.ModelInfo | None:
        """The serving load's model info, asking a stage for it at most once per load."""
        serving = self._cluster.serving
        if serving is None:
            return None
        if serving.load_id == self._load_id and self._info is not None:
            return self._info
        if self._task is None or serving.load_id != self._load_id:
            if self._task is not None:
                self._task.cancel()
            self._load_id, self._info = serving.load_id, None
            self._task = asyncio.create_task(self._inspect(serving.load_id))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), STATUS_WAIT_S)
        return self.current()

    async def _inspect(self, load_id: str) -> worker_pb2.ModelInfo | None:
        cluster = self._cluster
        serving = cluster.serving
        for stage in serving.assignments if serving is not None else ():
            member = cluster.members.get(stage.node_id)
            if member is None:
                continue
            try:
                info: worker_pb2.ModelInfo = await member.stub.InspectModel(
                    worker_pb2.InspectModelRequest(model=cluster.config.model),
                    timeout=rpc.INSPECT_TIMEOUT,
                )
            except grpc.aio.AioRpcError as e:
                log.info("%s could not describe %s: %s", member.name, cluster.config.model, e)
                continue
            if load_id == self._load_id:
                self._info = info
            return info
        if load_id == self._load_id:
            self._task = None  # the next Status asks again
        return None
