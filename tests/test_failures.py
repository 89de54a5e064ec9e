"""Node failure on the multi-host test bed: detect, end or retry, re-form, serve.

Three worker hosts and a coordinator host in network namespaces on one
bridge. The faults run in order on one cluster, each during a long streaming
generation: a worker killed, a runner killed, a host frozen, a link pulled
and put back, a link throttled. After each the cluster must serve a new
request correctly; the events log must tell the story; no request may end
silently. Set POMONA_FIGURES=path to write the table of figures there.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from clusterkit import coordinator_stub, generate_tokens, reference_tokens, wait_for, wait_serving
from modelfactory import make_model
from testbed import BedProc, TestBed, bed_fixture

from pomona.v1 import common_pb2, coordinator_pb2

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

PROMPT = "The lab has four machines and"
SHORT = "Once the cable was pulled"
HEARTBEAT_TIMEOUT = 3.0
# Detection (heartbeat timeout + a probe) plus the time to re-form on a busy
# 2-core machine.
RECOVERY_TIMEOUT = 120.0

bed = bed_fixture(4, scope="module")


@dataclass
class Cluster:
    bed: TestBed
    root: Path
    model: Path
    name: str
    workers: dict[int, BedProc] = field(default_factory=dict)
    coord: BedProc | None = None

    def start_worker(self, i: int) -> BedProc:
        self.workers[i] = self.bed.start_worker(
            i, f"w{i}", self.name, self.root, self.root / f"state-w{i}"
        )
        return self.workers[i]

    def status(self) -> coordinator_pb2.StatusReply:
        assert self.coord is not None
        return coordinator_stub(self.coord).Status(coordinator_pb2.StatusRequest(), timeout=10)

    def events(self, after: int = 0) -> list[coordinator_pb2.Event]:
        assert self.coord is not None
        stub = coordinator_stub(self.coord)
        return list(stub.Events(coordinator_pb2.EventsRequest(after=after), timeout=10))

    def serving_hosts(self) -> list[int]:
        """Bed host indices of the plan's stages, head first, once it serves."""
        assert self.coord is not None
        wait_serving(self.coord, timeout=RECOVERY_TIMEOUT)
        plan = self.status().plan
        by_name = {f"w{i}": i for i in self.workers}
        return [by_name[s.name] for s in plan]


@pytest.fixture(scope="module")
def cluster(bed: TestBed, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("failures")
    model = make_model(
        root / "llama", "llama", num_layers=6, overrides={"max_position_embeddings": 4096}
    )
    c = Cluster(bed, root, model, f"fail-{bed.run_id[-4:]}")
    for i in range(3):
        c.start_worker(i)
    c.coord = bed.start_coordinator(
        3,
        model,
        c.name,
        min_workers=3,
        extra=(
            "--objective", "throughput", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
            "--retry-timeout", "90", "--http-port", "0",
            "--state-dir", str(root / "coordinator"),
        ),
    )  # fmt: skip
    wait_serving(c.coord, timeout=240)
    return c


FIGURES: list[dict[str, object]] = []


@dataclass
class Stream:
    """A long streaming generation consumed in the background."""

    tokens: int = 0
    error: grpc.RpcError | None = None
    finish: int = 0
    ended: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


def start_stream(coord: BedProc, max_tokens: int = 3000) -> Stream:
    stream = Stream()
    request = common_pb2.GenerateRequest(prompt=PROMPT, max_tokens=max_tokens)

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
    c: Cluster, fault: str, inject: Callable[[], str], *, breaks: bool = True
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
        figures = {"fault": fault, "detect_s": "-", "serve_again_s": "-", "errors": 0,
                   "retried": 0, "silent": 0}  # fmt: skip
        FIGURES.append(figures)
        return figures
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
    assert "pipeline_failed" in kinds and "load_finished" in kinds
    broke = next(e for e in story if e.kind == "pipeline_failed")
    assert victim in broke.node_name or victim in broke.message
    retried = kinds.count("request_retried")
    failed = kinds.count("request_failed")
    figures = {
        "fault": fault,
        "detect_s": round(broke.timestamp - fault_wall, 1),
        "serve_again_s": round(serving_at - fault_at, 1),
        "stream_ended_s": round(stream.ended - fault_at, 1),
        "errors": failed,
        "retried": retried,
        "silent": 0,
        "stages": len(reply.plan),
    }
    FIGURES.append(figures)
    return figures


def test_worker_killed(cluster: Cluster, bed: TestBed) -> None:
    victim = cluster.serving_hosts()[-1]
    ids = {n.node.name: n.node.node_id for n in cluster.status().nodes}

    def inject() -> str:
        bed.kill(cluster.workers[victim], signal.SIGKILL)
        return f"w{victim}"

    figures = drill(cluster, "worker killed (kill -9)", inject)
    assert figures["stages"] == 2  # it keeps serving on the two that remain
    # The worker comes back under the same id and is not counted twice.
    cluster.start_worker(victim)
    wait_for(
        lambda: any(
            n.node.name == f"w{victim}" and n.node.state != coordinator_pb2.NODE_STATE_LOST
            for n in cluster.status().nodes
        ),
        60,
        "the worker to return",
    )
    nodes = cluster.status().nodes
    assert len(nodes) == 3
    assert {n.node.name: n.node.node_id for n in nodes} == ids


def test_runner_killed(cluster: Cluster, bed: TestBed) -> None:
    head = cluster.serving_hosts()[0]
    runner = next(
        n.node.shard.runner_pid for n in cluster.status().nodes if n.node.name == f"w{head}"
    )
    assert runner

    def inject() -> str:
        bed.kill(runner, signal.SIGKILL)
        return f"w{head}"

    figures = drill(cluster, "runner killed (kill -9)", inject)
    assert figures["stages"] == 3  # the returned worker is taken back in


def test_host_frozen(cluster: Cluster, bed: TestBed) -> None:
    victim = cluster.serving_hosts()[1]

    def inject() -> str:
        bed.freeze_host(victim)
        return f"w{victim}"

    try:
        drill(cluster, "host frozen (SIGSTOP)", inject)
    finally:
        bed.thaw_host(victim)
    wait_for(lambda: "node_returned" in [e.kind for e in cluster.events()][-5:], 60, "the return")


def test_link_down_then_restored(cluster: Cluster, bed: TestBed) -> None:
    victim = cluster.serving_hosts()[-1]

    def inject() -> str:
        bed.link_down(victim)
        return f"w{victim}"

    try:
        drill(cluster, "link down", inject)
    finally:
        bed.link_up(victim)
    # Link restored: the node returns under its id while the cluster serves on.
    restored = time.monotonic()
    wait_for(
        lambda: any(
            e.kind == "node_returned" and e.node_name == f"w{victim}" for e in cluster.events()
        ),
        60,
        "the node to return",
    )
    assert cluster.status().serving
    assert generate_tokens(cluster.coord, PROMPT, 8)[0] == reference_tokens(
        cluster.model, PROMPT, 8
    )
    FIGURES.append({"fault": "link restored", "detect_s": round(time.monotonic() - restored, 1),
                    "serve_again_s": 0, "errors": 0, "retried": 0, "silent": 0})  # fmt: skip


def test_link_throttled(cluster: Cluster, bed: TestBed) -> None:
    victim = cluster.serving_hosts()[-1]
    try:
        drill(
            cluster,
            "link throttled (tbf 1mbit)",
            lambda: bed.throttle(victim, rate="1mbit", burst="32kbit", latency="100ms") or "",
            breaks=False,
        )
    finally:
        bed.unthrottle(victim)


def test_restarted_coordinator_rediscovers_the_running_cluster(
    cluster: Cluster, bed: TestBed
) -> None:
    assert cluster.coord is not None
    cluster.serving_hosts()
    before = cluster.status()
    bed.kill(cluster.coord, signal.SIGKILL)
    killed = time.monotonic()
    cluster.coord = bed.start_coordinator(
        3,
        cluster.model,
        cluster.name,
        min_workers=1,
        extra=(
            "--objective", "throughput", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
            "--http-port", "0", "--state-dir", str(cluster.root / "coordinator"),
        ),
    )  # fmt: skip
    reply = wait_serving(cluster.coord, timeout=RECOVERY_TIMEOUT)
    # It found the workers over mDNS and adopted their loaded pipeline.
    assert cluster.status().load_id == before.load_id
    assert len(reply.nodes) == 3
    assert generate_tokens(cluster.coord, PROMPT, 8)[0] == reference_tokens(
        cluster.model, PROMPT, 8
    )
    FIGURES.append({"fault": "coordinator killed and restarted", "detect_s": "-",
                    "serve_again_s": round(time.monotonic() - killed, 1), "errors": 0,
                    "retried": 0, "silent": 0})  # fmt: skip


def test_figures_table(cluster: Cluster) -> None:
    """Prints (and with POMONA_FIGURES writes) the table of the drills above."""
    columns = ["fault", "detect_s", "serve_again_s", "errors", "retried", "silent"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(f.get(k, "")) for k in columns) + " |" for f in FIGURES]
    table = "\n".join(lines)
    print("\n" + table)
    if path := os.environ.get("POMONA_FIGURES"):
        Path(path).write_text(table + "\n")
    assert all(f["silent"] == 0 for f in FIGURES)
