"""The coordinator's event log: numbered events, bounded in memory, appended to a file.

Nodes joining, being lost and returning, plans, loads and failed requests: whatever a
person running the cluster would want to read back later. `pomona events` reads it
through `Coordinator.Events`; Prometheus counts it by kind. Each cluster has its own
file (`events_path`), so a coordinator shows its own cluster's history only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pomona.v1 import coordinator_pb2

log = logging.getLogger(__name__)

# The kinds recorded; the monitor records the node_* ones, the cluster the others.
NODE_JOINED = "node_joined"
NODE_LOST = "node_lost"
NODE_RETURNED = "node_returned"
NODE_DEGRADED = "node_degraded"
NODE_RECOVERED = "node_recovered"
PLAN_CHANGED = "plan_changed"
LOAD_STARTED = "load_started"
LOAD_FINISHED = "load_finished"
LOAD_FAILED = "load_failed"
REQUEST_FAILED = "request_failed"
REQUEST_RETRIED = "request_retried"
PIPELINE_FAILED = "pipeline_failed"
NODE_LEFT_OUT = "node_left_out"
TRANSFER_STARTED = "transfer_started"
TRANSFER_FINISHED = "transfer_finished"
TRANSFER_FAILED = "transfer_failed"
# The chosen MLX backend (JACCL, NCCL) could not form its group: loaded again over the ring.
BACKEND_FALLBACK = "backend_fallback"
# The head's draft model (speculative decoding) failed: decoding goes on without it.
DRAFT_FAILED = "draft_failed"
EVENT_KINDS = (
    NODE_JOINED, NODE_LOST, NODE_RETURNED, NODE_DEGRADED, NODE_RECOVERED,
    PLAN_CHANGED, LOAD_STARTED, LOAD_FINISHED, LOAD_FAILED, REQUEST_FAILED,
    REQUEST_RETRIED, PIPELINE_FAILED, NODE_LEFT_OUT, TRANSFER_STARTED, TRANSFER_FINISHED,
    TRANSFER_FAILED, BACKEND_FALLBACK, DRAFT_FAILED,
)  # fmt: skip


# The logs of this many clusters are kept: `pomona up --local` names a new cluster
# each time, and each would leave a file behind.
EVENT_LOGS_KEPT = 8
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")


def events_path(state_dir: Path, cluster: str) -> Path:
    """The event log of ``cluster`` under a coordinator's state directory."""
    name = (
        cluster
        if _FILE_NAME.fullmatch(cluster)
        else hashlib.sha256(cluster.encode()).hexdigest()[:16]
    )
    return state_dir / "events" / f"{name}.jsonl"


def prune_event_logs(current: Path, keep: int = EVENT_LOGS_KEPT) -> list[Path]:
    """Deletes the event logs beside ``current`` but those of the ``keep`` clusters
    written most recently (``current`` always among them); returns what it deleted."""
    logs = {}
    for path in current.parent.glob("*.jsonl"):
        with contextlib.suppress(OSError):
            logs[path] = path.stat().st_mtime
    others = sorted((p for p in logs if p != current), key=lambda p: logs[p], reverse=True)
    deleted = []
    for path in others[max(0, keep - 1) :]:
        for file in (path, path.with_name(path.name + ".1")):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
                deleted.append(file)
    return deleted


@dataclass(frozen=True)
class Event:
    seq: int
    timestamp: float  # Unix time
    kind: str
    node_id: str = ""
    node_name: str = ""
    message: str = ""

    def to_proto(self) -> coordinator_pb2.Event:
        return coordinator_pb2.Event(**asdict(self))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Event | None:
        try:
            d = json.loads(line)
            return cls(
                int(d["seq"]),
                float(d["timestamp"]),
                str(d["kind"]),
                str(d.get("node_id", "")),
                str(d.get("node_name", "")),
                str(d.get("message", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


class EventLog:
    """Numbered events: the last `capacity` in memory, all appended as JSON lines.

    The file is capped at `max_file_bytes`; when full it becomes `<path>.1` (replacing
    the previous one) and a new file starts. On start the log reads its files back, so
    sequence numbers keep counting across restarts. `counts()` are since this process
    started. `record` may be called from any thread; `follow` runs on an event loop.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        capacity: int = 10_000,
        max_file_bytes: int = 8 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._clock = clock
        self._path = path
        self._max_file_bytes = max_file_bytes
        self._file: IO[str] | None = None
        self._file_bytes = 0
        self._closed = False
        self._seq = 0
        if path is not None:
            self._read_back(path)

    @property
    def last_seq(self) -> int:
        return self._seq

    def _read_back(self, path: Path) -> None:
        for p in (path.with_name(path.name + ".1"), path):
            try:
                lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                event = Event.from_json(line)
                if event is not None and event.seq > self._seq:
                    self._events.append(event)
                    self._seq = event.seq

    def record(self, kind: str, node_id: str = "", node_name: str = "", message: str = "") -> Event:
        with self._lock:
            self._seq += 1
            event = Event(self._seq, self._clock(), kind, node_id, node_name, message)
            self._events.append(event)
            self._counts[kind] += 1
            self._append(event.to_json() + "\n")
            waiters = list(self._waiters)
        log.info("event %s %s %s", kind, node_name or node_id, message)
        self._wake(waiters)
        return event

    def _append(self, line: str) -> None:
        if self._path is None or self._closed:
            return
        size = len(line.encode("utf-8"))
        try:
            if self._file is not None and self._file_bytes + size > self._max_file_bytes:
                self._file.close()
                self._file = None
                os.replace(self._path, self._path.with_name(self._path.name + ".1"))
            if self._file is None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self._path.open("a", encoding="utf-8")
                self._file_bytes = self._file.tell()
            self._file.write(line)
            self._file.flush()
            self._file_bytes += size
        except OSError as e:
            # The log stays in memory; a full disk must not stop the coordinator.
            log.warning(
                "cannot append to the event log %s: %s; keeping events in memory only",
                self._path,
                e,
            )
            self._path = None

    @staticmethod
    def _wake(waiters: Iterable[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, wake in waiters:
            if loop is running:
                wake.set()
                continue
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that subscriber's loop has closed
                pass

    def since(self, after: int = 0) -> list[Event]:
        """The events held in memory whose sequence number is above `after`, in order."""
        with self._lock:
            newer: list[Event] = []
            for event in reversed(self._events):
                if event.seq <= after:
                    break
                newer.append(event)
        newer.reverse()
        return newer

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def count(self, kind: str) -> int:
        with self._lock:
            return self._counts[kind]

    async def follow(self, after: int = 0) -> AsyncIterator[Event]:
        """Events after `after`, then each new one as it is recorded, until `close()`.

        The recorder never waits for a subscriber: each reads the shared buffer at its
        own pace, and one that falls more than `capacity` events behind sees a gap in
        the sequence numbers.
        """
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(waiter)
        try:
            cursor = after
            while True:
                waiter[1].clear()
                batch = self.since(cursor)
                for event in batch:
                    cursor = event.seq
                    yield event
                if not batch:
                    if self._closed:
                        return
                    await waiter[1].wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    async def stream(self, after: int, follow: bool) -> AsyncIterator[coordinator_pb2.Event]:
        """What `Coordinator.Events` sends for an `EventsRequest`."""
        if not follow:
            for event in self.since(after):
                yield event.to_proto()
            return
        async for event in self.follow(after):
            yield event.to_proto()

    def close(self) -> None:
        """Ends every `follow` and closes the file."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
            waiters = list(self._waiters)
        self._wake(waiters)
