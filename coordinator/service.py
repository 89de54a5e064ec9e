"""The Coordinator gRPC service: the cluster's public entry point.

Thin: requests go through the Router (the same path the HTTP API takes);
errors keep their gRPC status and message from wherever they arose.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from pomona.coordinator.cluster import Cluster
from pomona.coordinator.distribution import cluster_models
from pomona.coordinator.model_info import ModelInfoCache
from pomona.coordinator.monitor import NodeInfo, to_status_reply
from pomona.coordinator.placement import PlacementError
from pomona.coordinator.router import GenerateError, Router
from pomona.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, transfer_pb2, worker_pb2

log = logging.getLogger(__name__)

_NODE_STATES = {
    "discovered": coordinator_pb2.NODE_STATE_DISCOVERED,
    "loading": coordinator_pb2.NODE_STATE_LOADING,
    "serving": coordinator_pb2.NODE_STATE_SERVING,
    "idle": coordinator_pb2.NODE_STATE_IDLE,
    "lost": coordinator_pb2.NODE_STATE_LOST,
}


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster, router: Router):
        self.cluster = cluster
        self.router = router
        self.model_info = ModelInfoCache(cluster)

    async def Generate(  # noqa: N802
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateChunk]:
        chunks = self.router.generate(request)
        try:
            async for chunk in chunks:
                yield chunk
        except (grpc.aio.AioRpcError, GenerateError) as e:
            await context.abort(e.code(), e.details() or "the head runner failed")
        finally:
            await chunks.aclose()

    def status_reply(self) -> coordinator_pb2.StatusReply:
        cluster = self.cluster
        serving = cluster.serving
        nodes = [
            NodeInfo(
                m.node_id, m.name, m.address, m.state, m.describe.hardware, m.describe.mlx_version
            )
            for m in cluster.members.values()
        ]
        reply = to_status_reply(
            cluster.monitor,
            cluster=cluster.config.cluster,
            model=cluster.config.model,
            serving=serving is not None,
            problem=cluster.problem,
            nodes=nodes,
            plan=serving.assignments if serving is not None else (),
            load_id=serving.load_id if serving is not None else "",
            model_info=self.model_info.current(),
            max_context=serving.max_context if serving is not None else 0,
        )
        reply.draft_model = cluster.config.draft_model
        reply.transfers.extend(cluster.distribution.node_transfers())
        reply.links.extend(cluster.links.to_proto())
        return reply

    async def Status(  # noqa: N802
        self, request: coordinator_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.StatusReply:
        await self.model_info.get()
        return self.status_reply()

    async def Events(  # noqa: N802
        self, request: coordinator_pb2.EventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.Event]:
        async for event in self.cluster.monitor.events.stream(request.after, request.follow):
            yield event

    async def ListModels(  # noqa: N802
        self, request: transfer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ClusterModels:
        members = self.cluster.usable()
        survey = await self.cluster.distribution.take_survey(members)
        return cluster_models(survey, {m.node_id: m.name for m in members})

    async def Pull(  # noqa: N802
        self, request: coordinator_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.PullProgress]:
        from pomona.coordinator.pull import pull

        try:
            async for progress in pull(self.cluster, request.model, max(0, request.workers)):
                yield progress
        except PlacementError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def ListNodes(  # noqa: N802
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ListNodesReply:
        cluster = self.cluster
        nodes = []
        for m in sorted(cluster.members.values(), key=lambda m: m.name):
            shard = m.describe.shard if m.describe.HasField("shard") else worker_pb2.ShardStatus()
            if cluster.serving is not None and m.node_id in cluster.serving.shards:
                shard = cluster.serving.shards[m.node_id]
            elif m.state == "lost" or cluster.serving is not None:
                # What it said when it joined no longer holds: it serves nothing.
                shard = worker_pb2.ShardStatus()
            nodes.append(
                coordinator_pb2.Node(
                    node_id=m.node_id,
                    name=m.name,
                    address=m.address,
                    state=_NODE_STATES[m.state],
                    hardware=m.describe.hardware,
                    shard=shard,
                    mlx_version=m.describe.mlx_version,
                    backend_facts=m.describe.backend_facts,
                )
            )
        return coordinator_pb2.ListNodesReply(
            cluster=cluster.config.cluster,
            model=cluster.config.model,
            problem=cluster.problem,
            nodes=nodes,
            serving=cluster.serving is not None,
            links=cluster.links.to_proto(),
        )
