"""The spare runner (worker/warm_runner.py): a real ``--warm`` process, taken or not, and
when the daemon starts the next one."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from pomona.config import WorkerConfig
from pomona.worker import daemon as daemon_module
from pomona.worker.daemon import WorkerDaemon
from pomona.worker.runner_process import ShardInfo, State
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


class _Runner:
    """A runner whose state the test sets (RunnerProcess's ``info`` and ``wait_change``)."""

    def __init__(self) -> None:
        self.info = ShardInfo(state=State.LOADING)
        self._changed = asyncio.Condition()

    async def set(self, state: State) -> None:
        async with self._changed:
            self.info = replace(self.info, state=state)
            self._changed.notify_all()

    async def wait_change(self, seen: ShardInfo | None, timeout: float) -> ShardInfo:
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.info is not seen), timeout
                )
            return self.info


def test_the_next_spare_waits_while_the_runner_serves_and_starts_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its imports would share the CPU with the first requests; a re-form needs it at once."""
    monkeypatch.setattr(daemon_module, "REFILL_AFTER_READY_S", 3600.0)

    async def scenario() -> None:
        daemon = WorkerDaemon(
            WorkerConfig(name="w", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
        )
        started = asyncio.Event()

        async def ensure() -> None:
            started.set()

        daemon.spare.ensure = ensure  # type: ignore[method-assign]
        runner = _Runner()
        refill = asyncio.create_task(daemon._refill_spare(runner))  # type: ignore[arg-type]
        await runner.set(State.READY)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not started.is_set()  # serving: no spare yet
        await runner.set(State.FAILED)
        await asyncio.wait_for(started.wait(), 30)
        await refill

    asyncio.run(scenario())
