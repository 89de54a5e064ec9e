"""When the coordinator makes its first plan: at once once every expected worker is in."""

from __future__ import annotations

import asyncio

import pytest

from pomona.config import CoordinatorConfig
from pomona.coordinator.cluster import Cluster, Member
from pomona.v1 import worker_pb2


def _members(cluster: Cluster, n: int) -> list[Member]:
    for i in range(n):
        node_id = f"{i:012x}"
        cluster.members[node_id] = Member(
            node_id,
            f"w{i}",
            f"10.0.0.{i + 1}:50151",
            worker_pb2.DescribeReply(),
            None,  # type: ignore[arg-type]
        )
    return cluster.usable()


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

        cluster.plan_and_load = plan_and_load  # type: ignore[method-assign]
        _members(cluster, 3)
        cluster.note_change()
        running = asyncio.create_task(cluster.run())
        try:
            await asyncio.wait_for(planned.wait(), 30)
        finally:
            running.cancel()

    asyncio.run(scenario())
