"""The spare runner (worker/warm_runner.py): a real ``--warm`` process, taken or not."""

from __future__ import annotations

import asyncio
import json

from pomona.worker.warm_runner import WarmRunner


def test_a_spare_imports_then_waits_and_is_taken_only_when_its_environment_fits() -> None:
    async def scenario() -> None:
        spare = WarmRunner()
        await spare.ensure()
        pid = spare.pid
        assert pid
        await spare.ensure()  # one spare at a time
        assert spare.pid == pid
        # CUDA picks its devices when the process starts: a load that sets them
        # needs a process of its own.
        assert spare.take({"CUDA_VISIBLE_DEVICES": "7"}) is None
        proc = spare.take({"MLX_RANK": "1"})
        assert proc is not None and proc.pid == pid and spare.pid == 0
        assert proc.stdout is not None and proc.stdin is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert json.loads(line) == {"event": "warm"}  # imports done, waiting
        proc.stdin.close()  # the daemon is gone: the spare leaves quietly
        assert await asyncio.wait_for(proc.wait(), 30) == 0

        off = WarmRunner(enabled=False)
        await off.ensure()
        assert off.pid == 0 and off.take({}) is None

    asyncio.run(scenario())


def test_a_dead_spare_is_not_taken_and_is_replaced() -> None:
    async def scenario() -> None:
        spare = WarmRunner()
        await spare.ensure()
        first = spare.pid
        await spare.stop()
        assert spare.take({}) is None
        await spare.ensure()
        assert spare.pid not in (0, first)
        await spare.stop()

    asyncio.run(scenario())
