"""Starting, watching and stopping a runner subprocess.

The daemon never runs model code: each loaded shard is a runner process, so a
new MLX group can form after any change of membership. The runner gets its
own process group (so nothing it starts outlives it), dies with the daemon
(stdin closes; on Linux also PR_SET_PDEATHSIG), and is killed on Unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from pomona.backends import RankLaunch
from pomona.worker.runner import RunnerSpec
from pomona.worker.runs_dir import prune_runs
from pomona.worker.warm_runner import runner_command, runner_env

log = logging.getLogger(__name__)


class State(Enum):
    EMPTY = "empty"
    STARTING = "starting"
    LOADING = "loading"
    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


TERMINAL = (State.FAILED, State.STOPPED)
# Where each file a backend needs is written, beside the runner's log (runs_dir).
RUN_FILES = {"MLX_HOSTFILE": "hosts", "MLX_IBV_DEVICES": "ibv-devices"}


@dataclass(frozen=True)
class ShardInfo:
    load_id: str = ""
    state: State = State.EMPTY
    model: str = ""
    start: int = 0
    end: int = 0
    rank: int = 0
    progress: float = 0.0
    runner_address: str = ""
    error: str = ""
    pid: int = 0
    weights_bytes: int = 0
    files: tuple[str, ...] = ()
    active_bytes: int = 0
    world_size: int = 0
    group_failed: bool = False
    backend: str = ""


@dataclass
class RunnerProcess:
    spec: RunnerSpec
    model: str
    # The variables and files that make the runner join its group (pomona.backends).
    launch: RankLaunch
    log_dir: Path
    load_timeout: float
    # A ready runner reports once a second from a thread of its own, which
    # MLX's evaluation does not block; this long without a line from it, the
    # process is frozen (stopped, or hung holding the interpreter).
    silence_timeout: float = 4.0
    # Seconds a runner whose weights are in may wait for its group (the other
    # ranks' fetches and loads): an hour fetches 13 GB at 30 MB/s.
    group_timeout: float = 3600.0
    info: ShardInfo = field(init=False)
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _stopping: bool = field(default=False, init=False)
    _stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20), init=False)
    # The runner's latest once-a-second report (RunnerStats field names).
    stats: dict[str, object] = field(default_factory=dict, init=False)
    _last_heard: float = field(default_factory=time.monotonic, init=False)
    # Whether the process was a spare, started before this load (warm_runner).
    adopted: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        s = self.spec
        self.info = ShardInfo(
            s.load_id,
            State.STARTING,
            self.model,
            s.start,
            s.end,
            s.rank,
            world_size=s.world_size,
            backend=s.backend,
        )

    async def start(self, warm: asyncio.subprocess.Process | None = None) -> None:
        """Start the runner, or hand the load to ``warm``, a spare runner (warm_runner)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        extra = dict(self.launch.env)
        for name, content in self.launch.files.items():
            path = self.log_dir / f"{RUN_FILES[name]}-{self.spec.load_id}.json"
            path.write_text(content)
            extra[name] = str(path)
        prune_runs(self.log_dir, current=self.spec.load_id)
        if warm is not None and warm.returncode is None and warm.stdin is not None:
            self._proc = warm
            self.adopted = True
            start = {"cmd": "start", "spec": self.spec.to_json(), "env": extra}
            warm.stdin.write((json.dumps(start) + "\n").encode())
            await warm.stdin.drain()
        else:
            self._proc = await asyncio.create_subprocess_exec(
                *runner_command(self.spec.to_json()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**runner_env(), **extra},
                start_new_session=True,
            )
        await self._set(pid=self._proc.pid)
        log.info(
            "runner %d %s for layers [%d, %d) as rank %d/%d",
            self._proc.pid,
            "(a spare) took the load" if self.adopted else "started",
            self.spec.start,
            self.spec.end,
            self.spec.rank,
            self.spec.world_size,
        )
        self._tasks = [
            asyncio.create_task(self._read_events()),
            asyncio.create_task(self._read_stderr()),
            asyncio.create_task(self._watch_exit()),
            asyncio.create_task(self._watch_load_time()),
            asyncio.create_task(self._watch_silence()),
        ]

    async def _set(self, **changes: object) -> None:
        async with self._changed:
            if self.info.state in TERMINAL and "state" in changes:
                return
            self.info = replace(self.info, **changes)  # type: ignore[arg-type]
            self._changed.notify_all()

    async def wait_change(self, seen: ShardInfo | None, timeout: float) -> ShardInfo:
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.info is not seen), timeout
                )
            return self.info

    async def _read_events(self) -> None:
        assert self._proc and self._proc.stdout
        async for raw in self._proc.stdout:
            self._last_heard = time.monotonic()
            try:
                event = json.loads(raw)
            except ValueError:
                log.info("runner: %s", raw.decode(errors="replace").rstrip())
                continue
            kind = event.get("event")
            if kind == "state":
                await self._set(
                    state=State(event["state"]), progress=float(event.get("progress", 0.0))
                )
            elif kind == "loaded":
                await self._set(
                    files=tuple(event.get("files", ())),
                    weights_bytes=int(event.get("weights_bytes", 0)),
                    active_bytes=int(event.get("active_bytes", 0)),
                    progress=1.0,
                )
            elif kind == "ready":
                await self._set(state=State.READY, runner_address=event.get("address", ""))
            elif kind == "failed":
                await self._set(
                    state=State.FAILED,
                    error=str(event.get("error", "")),
                    group_failed=bool(event.get("group", False)),
                )
            elif kind == "stats":
                event.pop("event")
                self.stats = event

    async def _read_stderr(self) -> None:
        assert self._proc and self._proc.stderr
        path = self.log_dir / f"runner-{self.spec.load_id}.log"
        with path.open("ab") as f:
            async for line in self._proc.stderr:
                f.write(line)
                f.flush()
                self._stderr_tail.append(line.decode(errors="replace").rstrip())

    async def _watch_exit(self) -> None:
        assert self._proc
        code = await self._proc.wait()
        if self._stopping:
            await self._set(state=State.STOPPED)
        else:
            tail = " | ".join(list(self._stderr_tail)[-3:])
            await self._set(
                state=State.FAILED,
                error=f"runner exited with code {code}" + (f": {tail}" if tail else ""),
                # Dying while joining its group (NCCL exits the process on a group it
                # cannot form): the group failed, and another backend may form.
                group_failed=self.info.state is State.CONNECTING,
            )
        log.info("runner %d exited with code %s", self._proc.pid, code)

    async def _watch_load_time(self) -> None:
        """Fail a runner that does not load within ``load_timeout``, or, once its weights
        are in, does not join its group within ``group_timeout``.

        The two are apart because a rank may load long before its group can form:
        the coordinator starts each worker's load as soon as that worker holds its
        stage, while others may still be fetching theirs for minutes.
        """
        deadline = time.monotonic() + self.load_timeout
        loaded = False
        info = self.info
        while info.state not in (State.READY, *TERMINAL):
            if not loaded and info.progress >= 1.0:
                loaded = True
                deadline = time.monotonic() + self.group_timeout
            left = deadline - time.monotonic()
            if left <= 0:
                what = "join its group" if loaded else "load and join its group"
                bound = self.group_timeout if loaded else self.load_timeout
                log.error("runner did not %s in %.0f s; stopping it", what, bound)
                await self._set(
                    state=State.FAILED,
                    error=f"the runner did not {what} within {bound:.0f} s "
                    f"(last state: {info.state.value})",
                    group_failed=info.state is State.CONNECTING,
                )
                await self.stop(grace=0.0)
                return
            info = await self.wait_change(info, left)

    async def _watch_silence(self) -> None:
        """Fail (and kill) a ready runner that stops reporting."""
        tick = 0.5
        checked = time.monotonic()
        while self.info.state not in TERMINAL:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - checked > 4 * tick:
                # This daemon was not running (stopped, or the machine slept):
                # what the runner said meanwhile is still unread.
                self._last_heard = now
            checked = now
            silent = now - self._last_heard
            if self.info.state is State.READY and silent > self.silence_timeout:
                pid = self._proc.pid if self._proc else 0
                log.error("runner %d sent nothing for %.1f s; killing it", pid, silent)
                await self._set(
                    state=State.FAILED,
                    error=f"the runner (pid {pid}) stopped answering for {silent:.1f} s: "
                    "its process is frozen (stopped, or hung)",
                )
                await self.stop(grace=0.0)
                return

    async def send(self, command: dict[str, object]) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.returncode is not None:
            raise RuntimeError("no runner is running")
        self._proc.stdin.write((json.dumps(command) + "\n").encode())
        await self._proc.stdin.drain()

    async def stop(self, grace: float = 1.0) -> None:
        """Ask the runner to stop, then kill its process group.

        An idle runner stops at once; one inside a torn-down group is stuck
        in the ring and never reads the request, so the grace is short.
        """
        self._stopping = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            await self._set(state=State.STOPPED)
            return
        with contextlib.suppress(Exception):
            await self.send({"cmd": "stop"})
            if proc.stdin:
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except asyncio.TimeoutError:
                continue
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)
        await self._set(state=State.STOPPED)

    def kill_now(self) -> None:
        """Synchronous last resort at interpreter exit."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
