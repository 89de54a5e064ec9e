"""A runner process started ahead of its load, its imports already done.

A runner spends its first seconds importing MLX, mlx-lm and the tokenizer
stack (2–3 s of CPU, more than loading a small stage), and every rank of a
group waits for the slowest. So the daemon keeps one spare runner: started
with the daemon, it imports everything and then waits, blocked on its stdin,
for a load's spec and the environment that makes it join its group. A ``Load``
adopts it (``RunnerProcess.start(warm=...)``) instead of starting a process,
and once that runner has failed, or has served for ``REFILL_AFTER_READY_S``,
the daemon starts the next spare, so a re-form after a failure starts without
the imports too. A coordinator's
survey before a plan starts one if none is alive.

One spare at a time, idle (a few hundred MB, no CPU). It dies with the daemon
(its stdin closes) and, on Linux, with the daemon's process
(``PR_SET_PDEATHSIG``), like any runner. ``pomona worker --no-spare-runner``
turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

WARM_FLAG = "--warm"
# Variables a process must have from its start (CUDA reads its device list once,
# when MLX first touches the GPU): a load that needs them starts a fresh process.
START_ONLY_ENV = ("CUDA_VISIBLE_DEVICES",)
# Seconds between a runner that took the spare coming up and the next spare's start:
# its imports would otherwise compete with the first requests for the CPU.
REFILL_AFTER_READY_S = 10.0


def runner_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pomona.worker.runner", *args]


def runner_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class WarmRunner:
    """At most one spare runner process, waiting for a load."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None and self._alive() else 0

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def ensure(self) -> None:
        """Start a spare unless one is alive (or spares are off)."""
        if not self.enabled:
            return
        async with self._lock:
            if self._alive():
                return
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *runner_command(WARM_FLAG),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=runner_env(),
                    start_new_session=True,
                )
            except OSError as e:
                log.warning("cannot start a spare runner: %s", e)
                self._proc = None
                return
            log.info("spare runner %d started", self._proc.pid)

    def take(self, env: dict[str, str]) -> asyncio.subprocess.Process | None:
        """The spare, now the caller's, if one is alive and can run a load with ``env``."""
        if not self._alive() or any(
            env.get(name, os.environ.get(name)) != os.environ.get(name) for name in START_ONLY_ENV
        ):
            return None
        proc, self._proc = self._proc, None
        return proc

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 3.0)
