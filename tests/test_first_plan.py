"""When the coordinator makes its first plan: at once once every expected worker is in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pomona.config import CoordinatorConfig
from pomona.coordinator.cluster import Cluster, Member
from pomona.v1 import worker_pb2


def _member(cluster: Cluster, i: int, describe: worker_pb2.DescribeReply) -> Member:
    node_id = f"{i:012x}"
    member = cluster.members[node_id] = Member(
        node_id,
        f"w{i}",
        f"10.0.0.{i + 1}:50151",
        describe,
        None,  # type: ignore[arg-type]
    )
    return member


def _members(cluster: Cluster, n: int) -> list[Member]:
    for i in range(n):
        _member(cluster, i, worker_pb2.DescribeReply())
    return cluster.usable()


@contextlib.asynccontextmanager
async def _planning(
    cluster: Cluster, plan_and_load: Callable[[], Awaitable[None]]
) -> AsyncIterator[None]:
    """The cluster's planning loop running, with ``plan_and_load`` in place of a load."""
    cluster.plan_and_load = plan_and_load  # type: ignore[method-assign]
    cluster.note_change()
    running = asyncio.create_task(cluster.run())
    try:
        yield
    finally:
        running.cancel()


@pytest.mark.parametrize(
    ("min_workers", "present", "served", "at_once"),
    [
        (3, 3, False, True),  # every worker it was told to expect
        (3, 4, False, True),
        (1, 3, False, False),  # not told how many: let the Bonjour answers settle
        (3, 3, True, False),  # a re-form: min_workers no longer counts
    ],
)
def test_the_settle_is_skipped_only_when_every_expected_worker_is_in(
    min_workers: int, present: int, served: bool, at_once: bool
) -> None:
    cluster = Cluster(CoordinatorConfig(min_workers=min_workers))
    cluster.ever_served = served
    assert cluster.all_expected(_members(cluster, present)) is at_once


def test_the_first_plan_starts_without_the_settle_once_min_workers_are_in() -> None:
    async def scenario() -> None:
        # A settle of an hour: the plan can only start because it is skipped.
        cluster = Cluster(CoordinatorConfig(min_workers=3, settle_seconds=3600.0))
        planned = asyncio.Event()

        async def plan_and_load() -> None:
            planned.set()

        _members(cluster, 3)
        async with _planning(cluster, plan_and_load):
            await asyncio.wait_for(planned.wait(), 30)

    asyncio.run(scenario())


MODEL = "/models/big"


def _rank(cluster: Cluster, rank: int, load: str = "L1", world: int = 3) -> Member:
    shard = worker_pb2.ShardStatus(
        state=worker_pb2.SHARD_STATE_READY, model=MODEL, load_id=load, rank=rank, world_size=world
    )
    return _member(cluster, rank, worker_pb2.DescribeReply(shard=shard))


def test_the_first_plan_waits_for_every_rank_of_a_running_load() -> None:
    async def scenario() -> None:
        cluster = Cluster(CoordinatorConfig(model=MODEL, settle_seconds=0.0))
        _rank(cluster, 0)
        _rank(cluster, 2)
        assert "2 of its 3 ranks found" in cluster.missing_ranks(cluster.usable())
        _rank(cluster, 1)
        assert cluster.missing_ranks(cluster.usable()) == ""
        cluster._dead_loads.add("L1")  # a load that broke is never waited for
        del cluster.members[f"{1:012x}"]
        assert cluster.missing_ranks(cluster.usable()) == ""

    asyncio.run(scenario())


def test_a_restarted_coordinator_plans_with_every_rank_or_after_the_wait() -> None:
    async def scenario(third_comes: bool) -> list[int]:
        # --min-workers 1 and no settle: without the wait it would plan at once.
        config = CoordinatorConfig(model=MODEL, settle_seconds=0.0, adopt_wait_seconds=1.0)
        cluster = Cluster(config)
        planned: list[int] = []
        done = asyncio.Event()

        async def plan_and_load() -> None:
            planned.append(len(cluster.usable()))
            cluster.ever_served = True
            done.set()

        _rank(cluster, 1)
        async with _planning(cluster, plan_and_load):
            await asyncio.sleep(0.2)
            assert not planned and "1 of its 3 ranks" in cluster.problem
            _rank(cluster, 0)
            cluster.note_change()
            await asyncio.sleep(0.2)
            assert not planned
            if third_comes:
                _rank(cluster, 2)
                cluster.note_change()
            await asyncio.wait_for(done.wait(), 10)
        return planned

    assert asyncio.run(scenario(third_comes=True)) == [3]
    assert asyncio.run(scenario(third_comes=False)) == [2]  # the wait ran out: plan anyway
