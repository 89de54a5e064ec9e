"""`pomona pull`: stage a model's files on the workers that would hold it, ahead of serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from pomona import rpc
from pomona.coordinator.cluster import Cluster
from pomona.coordinator.distribution import Survey, check_disk, prefer_holders
from pomona.coordinator.placement import Assignment, PlacementError, place
from pomona.v1 import coordinator_pb2, worker_pb2

log = logging.getLogger(__name__)

POLL_S = 0.5


async def plan_pull(cluster: Cluster, model: str, workers: int) -> tuple[list[Assignment], Survey]:
    """The stages ``model`` would have on ``workers`` workers (0: all), holders preferred."""
    members = cluster.usable()
    if workers:
        members = members[:workers]
    if not members:
        raise PlacementError("there are no workers to pull to")
    dist = cluster.distribution
    survey = await dist.take_survey(members, model)
    inspector = dist.holders_first(members, model, survey)[0]
    info = await dist.local_profile(model)
    try:
        info = info or await inspector.stub.InspectModel(
            worker_pb2.InspectModelRequest(model=model), timeout=rpc.INSPECT_TIMEOUT
        )
    except grpc.aio.AioRpcError as e:
        raise PlacementError(rpc.describe_error(e, inspector.address)) from e
    config = cluster.config
    assignments, _ = place(
        info,
        [m.describe for m in members],
        context=config.context,
        concurrency=config.concurrency,
        objective=config.objective,
    )
    assignments = prefer_holders(assignments, [m.describe for m in members], survey, model)
    check_disk(assignments, survey, model)
    return assignments, survey


async def pull(
    cluster: Cluster, model: str, workers: int
) -> AsyncIterator[coordinator_pb2.PullProgress]:
    """Progress of every worker's transfer until each holds its stage; PlacementError if not."""
    assignments, survey = await plan_pull(cluster, model, workers)
    plan = [
        coordinator_pb2.PlanStage(
            node_id=a.node_id,
            name=a.name,
            start_layer=a.start,
            end_layer=a.end,
            weights_bytes=a.weights_bytes,
        )
        for a in assignments
    ]
    dist = cluster.distribution
    members = cluster.usable()
    task = asyncio.create_task(
        dist.stage_all(model, members, assignments, survey, cluster.config.load_timeout)
    )
    try:
        while not task.done():
            yield coordinator_pb2.PullProgress(plan=plan, transfers=dist.node_transfers())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), POLL_S)
        task.result()
        yield coordinator_pb2.PullProgress(plan=plan, transfers=dist.node_transfers(), done=True)
    finally:
        task.cancel()
