"""Fault drills shared by the namespace test bed and loopback: inject, watch, check.

A drill injects one fault during a long streaming generation and checks what a
person running the cluster cares about: the stream ends with an error naming
the victim (never as a normal finish), a request sent after the fault with no
token yet is retried and answered correctly, the cluster serves again, and the
event log tells the story. Each drill adds a row of figures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from clusterkit import coordinator_stub, generate_tokens, reference_tokens, wait_for

from pomona.v1 import common_pb2, coordinator_pb2

PROMPT = "The lab has four machines and"
SHORT = "Once the cable was pulled"
RECOVERY_TIMEOUT = 120.0


class Drillable(Protocol):
    coord: Any
    model: Path

    def status(self) -> coordinator_pb2.StatusReply: ...

    def events(self, after: int = 0) -> list[coordinator_pb2.Event]: ...


FIGURES: list[dict[str, object]] = []


@dataclass
class Stream:
    """A long streaming generation consumed in the background."""

    tokens: int = 0
    error: grpc.RpcError | None = None
    finish: int = 0
    ended: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


def start_stream(coord: Any, max_tokens: int = 3000, prompt: str = PROMPT) -> Stream:
    stream = Stream()
    request = common_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens)

    def consume() -> None:
        try:
            for chunk in coordinator_stub(coord).Generate(request, timeout=300):
                stream.tokens += len(chunk.tokens)
                stream.finish = chunk.finish_reason or stream.finish
        except grpc.RpcError as e:
            stream.error = e
        finally:
            stream.ended = time.monotonic()
            stream.done.set()

    threading.Thread(target=consume, daemon=True).start()
    wait_for(lambda: stream.tokens >= 5 or stream.done.is_set(), 60, "the stream to start")
    assert not stream.done.is_set(), "the stream ended before the fault"
    return stream


def drill(
    c: Drillable,
    fault: str,
    inject: Callable[[], str],
    *,
    breaks: bool = True,
    figures: list[dict[str, object]] = FIGURES,
) -> dict[str, object]:
    """Inject a fault during a long stream; check the ending, the recovery, the story."""
    assert c.coord is not None
    before = c.status()
    last_seq = max((e.seq for e in c.events()), default=0)
    stream = start_stream(c.coord)
    fault_wall, fault_at = time.time(), time.monotonic()
    victim = inject()
    # A request with no token yet: it must be retried on the re-formed pipeline.
    waiting: dict[str, object] = {}

    def late_request() -> None:
        try:
            waiting["tokens"] = generate_tokens(c.coord, SHORT, max_tokens=8)[0]
        except grpc.RpcError as e:
            waiting["error"] = e

    late = threading.Thread(target=late_request, daemon=True)
    late.start()
    if not breaks:
        assert stream.done.wait(RECOVERY_TIMEOUT), "the stream hung under the fault"
        assert stream.error is None, stream.error
        assert stream.finish == common_pb2.FINISH_REASON_LENGTH and stream.tokens == 3000
        late.join(RECOVERY_TIMEOUT)
        assert waiting.get("tokens") == reference_tokens(c.model, SHORT, 8)
        row = {"fault": fault, "detect_s": "-", "serve_again_s": "-", "errors": 0,
               "retried": 0, "silent": 0}  # fmt: skip
        figures.append(row)
        return row
    assert stream.done.wait(RECOVERY_TIMEOUT), "the stream hung after the fault"
    # It ended with an error that names what broke, never as a normal finish.
    assert stream.error is not None, f"the stream ended normally after {stream.tokens} tokens"
    assert stream.error.code() == grpc.StatusCode.UNAVAILABLE
    assert victim in stream.error.details(), stream.error.details()
    reply = wait_for(
        lambda: (s := c.status()).serving and s.load_id != before.load_id and s,
        RECOVERY_TIMEOUT,
        "the cluster to serve again",
    )
    serving_at = time.monotonic()
    late.join(RECOVERY_TIMEOUT)
    assert waiting.get("tokens") == reference_tokens(c.model, SHORT, 8), waiting
    # A new request is served correctly.
    assert generate_tokens(c.coord, PROMPT, 16)[0] == reference_tokens(c.model, PROMPT, 16)
    story = [e for e in c.events(last_seq)]
    kinds = [e.kind for e in story]
    assert "pipeline_failed" in kinds and "load_finished" in kinds, kinds
    broke = next(e for e in story if e.kind == "pipeline_failed")
    assert victim in broke.node_name or victim in broke.message, broke
    retried = kinds.count("request_retried")
    failed = kinds.count("request_failed")
    row = {
        "fault": fault,
        "detect_s": round(broke.timestamp - fault_wall, 1),
        "serve_again_s": round(serving_at - fault_at, 1),
        "stream_ended_s": round(stream.ended - fault_at, 1),
        "errors": failed,
        "retried": retried,
        "silent": 0,
        "stages": len(reply.plan),
    }
    figures.append(row)
    return row


def figures_table(figures: list[dict[str, object]], path: str | None = None) -> str:
    """The drills' figures as a Markdown table, printed (and written to ``path``)."""
    columns = ["fault", "detect_s", "serve_again_s", "errors", "retried", "silent"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(f.get(k, "")) for k in columns) + " |" for f in figures]
    table = "\n".join(lines)
    print("\n" + table)
    if path:
        Path(path).write_text(table + "\n")
    assert all(f["silent"] == 0 for f in figures)
    return table
