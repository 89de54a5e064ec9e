"""`pomona status` renderings: a table that fits the terminal, stable JSON, a live view.

The table has one row per node and a cluster summary line. Columns that do not fit the
terminal's width are dropped, least useful first (RTT, swap, GPU, tokens/s, CPU,
layers), so that no row ever wraps, down to 80 columns and below. A figure the node's OS
does not provide is shown as "n/a".
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from google.protobuf.json_format import MessageToDict
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from pomona.coordinator.monitor import derive_state
from pomona.links_view import link_lines
from pomona.units import format_bytes
from pomona.v1 import coordinator_pb2

__all__ = ["SCHEMA", "print_status", "run_live", "state_name", "status_json", "status_view"]

SCHEMA = "pomona.status/v1"
GIB = 2**30  # memory is sized in binary units: a "64 GB" Mac has 64 GiB
STATE_STYLES = {
    "serving": "bold green",
    "idle": "blue",
    "discovered": "cyan",
    "loading": "yellow",
    "degraded": "bold dark_orange",
    "lost": "bold red",
    "unspecified": "dim",
}
_NAME_MAX = 16


@dataclass(frozen=True)
class _Column:
    key: str
    header: str
    justify: JustifyMethod = "right"


# In the order shown; DROP_ORDER says which go first when the terminal is narrow.
_COLUMNS = (
    _Column("name", "node", "left"),
    _Column("state", "state", "left"),
    _Column("layers", "layers"),
    _Column("memory", "memory"),
    _Column("swap", "swap"),
    _Column("cpu", "cpu"),
    _Column("gpu", "gpu"),
    _Column("tokens", "tok/s"),
    _Column("rtt", "rtt"),
)
DROP_ORDER = ("rtt", "swap", "gpu", "tokens", "cpu", "layers", "memory")


def state_name(value: int) -> str:
    return str(coordinator_pb2.NodeState.Name(value)).removeprefix("NODE_STATE_").lower()


def status_json(reply: coordinator_pb2.StatusReply) -> dict[str, Any]:
    """The `--json` document: `schema`, then the reply by the proto3 JSON mapping with
    proto field names. Unset optional figures ("n/a") are absent; 64-bit integers are
    strings; enums are their names (see docs/monitoring.md)."""
    body = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {"schema": SCHEMA, **body}


# ---- the table ---------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}" if n < 100 * GIB else f"{n / GIB:.0f}"


def _size(n: float) -> str:
    return "0 B" if n == 0 else f"{_gib(n)} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"


def _layers(start: int, end: int) -> str:
    """Layers [start, end) as people count them: "0-39", "40", or "-" for none."""
    if end <= start:
        return "-"
    return str(start) if end == start + 1 else f"{start}-{end - 1}"


def _cells(
    status: coordinator_pb2.NodeStatus, plan: Sequence[coordinator_pb2.PlanStage] = ()
) -> dict[str, Text]:
    node, sample = status.node, status.sample
    state = state_name(node.state)
    label = state
    has_sample = status.HasField("sample")  # none yet, or lost: its figures are stale
    start, end = node.shard.start_layer, node.shard.end_layer
    if not has_sample:  # the layers the plan in force gives it, if any
        planned = [s for s in plan if s.node_id == node.node_id]
        start, end = (planned[0].start_layer, planned[0].end_layer) if planned else (0, 0)
    if node.state == coordinator_pb2.NODE_STATE_LOADING and has_sample:
        label = f"loading {sample.shard.progress * 100:.0f}%"
    total = sample.memory_total_bytes or node.hardware.total_memory_bytes
    cells = {
        "name": node.name or node.node_id[:8],
        "layers": _layers(start, end),
        "memory": f"{_gib(sample.memory_used_bytes)}/{_gib(total)} GiB" if has_sample else "n/a",
        "swap": _size(sample.swap_used_bytes) if has_sample else "n/a",
        "cpu": f"{sample.cpu_percent:.0f}%" if has_sample else "n/a",
        "gpu": f"{sample.gpu_utilization_percent:.0f}%"
        if sample.HasField("gpu_utilization_percent")
        else "n/a",
        "tokens": f"{status.pipeline_tokens_per_s:.1f}"
        if status.HasField("pipeline_tokens_per_s")
        else "-",
        "rtt": f"{status.heartbeat_rtt_s * 1000:.1f} ms"
        if status.HasField("heartbeat_rtt_s")
        else "n/a",
    }
    result = {key: Text(value) for key, value in cells.items()}
    result["state"] = Text(label, style=STATE_STYLES.get(state, ""))
    return result


def _table(reply: coordinator_pb2.StatusReply, keys: list[str]) -> Table:
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for column in _COLUMNS:
        if column.key in keys:
            table.add_column(
                column.header,
                justify=column.justify,
                no_wrap=True,
                overflow="ellipsis",
                max_width=_NAME_MAX if column.key == "name" else None,
            )
    for status in reply.nodes:
        cells = _cells(status, reply.plan)
        lost = status.node.state == coordinator_pb2.NODE_STATE_LOST
        table.add_row(*(cells[k] for k in keys), style="dim" if lost else None)
    return table


def fitted_table(reply: coordinator_pb2.StatusReply, width: int) -> Table:
    """The node table with as many columns as fit in `width`."""
    console = Console(width=max(width, 20) * 4, file=io.StringIO())
    keys = [c.key for c in _COLUMNS]
    for drop in (None, *DROP_ORDER):
        if drop is not None:
            keys.remove(drop)
        table = _table(reply, keys)
        if Measurement.get(console, console.options, table).maximum <= width:
            break
    return table


def _summary(reply: coordinator_pb2.StatusReply, width: int) -> list[Text]:
    """One line of the cluster's figures, dropping the least useful to fit `width`;
    when not serving, a second line says why, in full."""
    states = [state_name(n.node.state) for n in reply.nodes]
    ttft = f"{reply.ttft_s:.2f} s" if reply.HasField("ttft_s") else "n/a"
    # (text, style, priority): the lowest priority is dropped first.
    parts = [
        (f"{reply.tokens_per_s:.1f} tok/s", "", 7),
        (f"TTFT {ttft}", "", 6),
        (f"req {reply.requests_in_flight} now", "", 3),
        (f"{reply.requests_total} total", "", 1),
        (f"{reply.requests_failed} failed", "", 4 if reply.requests_failed else 2),
    ]
    if reply.prompt_cache_budget_bytes:
        hits = (
            f", {reply.prompt_cache_hit_rate:.0%} hits"
            if reply.HasField("prompt_cache_hit_rate")
            else ""
        )
        parts.append(
            (
                f"prompt cache {format_bytes(reply.prompt_cache_bytes)}"
                f"/{format_bytes(reply.prompt_cache_budget_bytes)}{hits}",
                "",
                2,
            )
        )
    if reply.draft_model:
        draft = f"draft {reply.draft_model.rsplit('/', 1)[-1]}"
        if reply.HasField("draft_acceptance_rate"):
            draft += f" {reply.draft_acceptance_rate:.0%} accepted"
        if reply.HasField("tokens_per_verify_step"):
            draft += f", {reply.tokens_per_verify_step:.2f} tok/verify"
        parts.append((draft, "", 5))
    for state in ("degraded", "lost"):  # also in the table: less urgent here
        if states.count(state):
            parts.append((f"{states.count(state)} {state}", STATE_STYLES[state], 5))
    head = Text.assemble(
        ("serving", "bold green") if reply.serving else ("not serving", "bold red"),
        f" {reply.model.rsplit('/', 1)[-1]}",  # the full name is in --json
    )
    while True:
        line = head.copy()
        for text, style, _ in parts:
            line.append(" · ")
            line.append(text, style=style)
        if line.cell_len <= width or not parts:
            break
        parts.remove(min(parts, key=lambda p: p[2]))
    line.no_wrap, line.overflow = True, "ellipsis"
    if reply.serving:
        return [line]
    return [line, Text(f"why: {reply.problem or 'no reason given'}", style="red")]


def _notes(reply: coordinator_pb2.StatusReply) -> list[Text]:
    """Why each degraded or lost node is so, from the facts in its sample."""
    notes = []
    for status in reply.nodes:
        state = state_name(status.node.state)
        if state not in ("degraded", "lost"):
            continue
        sample = status.sample if status.HasField("sample") else None
        rtt = status.heartbeat_rtt_s if status.HasField("heartbeat_rtt_s") else None
        health = derive_state(
            membership="idle", sample=sample, seen_ago_s=status.last_seen_s, heartbeat_rtt_s=rtt
        )
        why = "; ".join(health.reasons) or "see `pomona events`"
        if state == "lost" and not health.reasons:
            why = f"last seen {status.last_seen_s:.0f} s ago"
        notes.append(Text(f"{status.node.name}: {why}", style=STATE_STYLES[state]))
    return notes


def transfer_lines(transfers: Iterable[coordinator_pb2.NodeTransfer]) -> list[Text]:
    """One line per worker's stage transfer: bytes, rate and time left, or how it ended."""
    lines = []
    for t in transfers:
        p = t.progress
        share = f"{_size(p.bytes_done)} of {_size(p.bytes_total)}"
        if p.state == "fetching":
            pct = 100 * p.bytes_done / p.bytes_total if p.bytes_total else 0
            eta = f", {p.eta_s:.0f} s left" if p.HasField("eta_s") else ""
            text = (
                f"{t.name}: fetching its stage, {share} ({pct:.0f}%), {_size(p.bytes_per_s)}/s{eta}"
            )
            lines.append(Text(text, style="cyan"))
        elif p.state == "done":
            lines.append(Text(f"{t.name}: stage fetched, {_size(p.bytes_received)} received"))
        else:
            lines.append(
                Text(f"{t.name}: stage already held ({_size(p.bytes_total)})", style="dim")
            )
    return lines


def status_view(
    reply: coordinator_pb2.StatusReply | None,
    width: int,
    *,
    header: str = "",
    error: str = "",
) -> RenderableType:
    """The table, the summary line and notes on troubled nodes, fitted to `width`."""
    parts: list[RenderableType] = []
    if header:
        parts.append(Text(header, style="dim", no_wrap=True, overflow="ellipsis"))
    if error:
        parts.append(Text(error, style="bold red"))
    if reply is not None:
        parts.append(fitted_table(reply, width))
        parts.extend(_summary(reply, width))
        parts.extend(_notes(reply))
        parts.extend(transfer_lines(reply.transfers))
        parts.extend(link_lines(reply.links))
    return Group(*parts)


def print_status(reply: coordinator_pb2.StatusReply, console: Console | None = None) -> None:
    console = console or Console()
    console.print(status_view(reply, console.width))


# ---- the live view -----------------------------------------------------------------


class _Poller:
    """Fetches in a background thread so that a slow coordinator never delays `q`."""

    def __init__(self, fetch: Callable[[], coordinator_pb2.StatusReply], interval_s: float):
        self._fetch, self._interval_s = fetch, interval_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._due = 0.0
        self.reply: coordinator_pb2.StatusReply | None = None
        self.error = ""
        self.updated: float | None = None
        self.version = 0

    def poll(self) -> None:
        now = time.monotonic()
        if now >= self._due and (self._thread is None or not self._thread.is_alive()):
            self._due = now + self._interval_s
            self._thread = threading.Thread(target=self._run, name="status-fetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            reply, error = self._fetch(), ""
        except Exception as e:  # shown in the view, retried at the next refresh
            reply, error = None, f"{e} (retrying)"
        with self._lock:
            if reply is not None:
                self.reply, self.updated = reply, time.time()
            self.error = error
            self.version += 1

    def latest(self) -> tuple[int, coordinator_pb2.StatusReply | None, str, float | None]:
        with self._lock:
            return self.version, self.reply, self.error, self.updated


@contextlib.contextmanager
def _cbreak(stream: TextIO) -> Iterator[int | None]:
    """Keys one at a time without echo (Ctrl-C still interrupts); the terminal's
    settings restored on the way out, however it is left. None when not a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout_s: float) -> bool:
    if fd is None:
        time.sleep(timeout_s)
        return False
    ready, _, _ = select.select([fd], [], [], timeout_s)
    if not ready:
        return False
    keys = os.read(fd, 64)
    return not keys or any(k in keys for k in (b"q", b"Q", b"\x03"))


def run_live(
    fetch: Callable[[], coordinator_pb2.StatusReply],
    *,
    refresh_s: float = 1.0,
    console: Console | None = None,
    keys: TextIO | None = None,
    title: str = "pomona status",
) -> None:
    """Shows the status full-screen, refreshed every `refresh_s`, until `q` or Ctrl-C.

    `fetch` may raise; its message is shown and it is tried again at the next refresh.
    """
    console = console or Console()
    poller = _Poller(fetch, refresh_s)
    shown = (-1, 0)  # (version, width) on screen: a new reply or a resize redraws
    try:
        with (
            _cbreak(keys if keys is not None else sys.stdin) as fd,
            Live(console=console, screen=True, auto_refresh=False, redirect_stderr=False) as live,
        ):
            while True:
                poller.poll()
                version, reply, error, updated = poller.latest()
                if (version, console.width) != shown:
                    shown = (version, console.width)
                    at = time.strftime("%H:%M:%S", time.localtime(updated)) if updated else "-"
                    header = f"{title} · updated {at} · q to quit"
                    live.update(status_view(reply, console.width, header=header, error=error))
                    live.refresh()
                if _quit_pressed(fd, 0.05):
                    return
    except KeyboardInterrupt:
        return
