"""`pomona status`: a table that never wraps a row, and JSON with a stable schema."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from pomona.status_view import SCHEMA, print_status, status_json, status_view
from pomona.v1 import coordinator_pb2, worker_pb2

GIB = 2**30
STATES = coordinator_pb2.NodeState


def node_status(
    name: str,
    state: int,
    *,
    layers: tuple[int, int] | None = None,
    gpu: float | None = None,
    rtt: float | None = None,
    sampled: bool = True,
    progress: float = 1.0,
) -> coordinator_pb2.NodeStatus:
    status = coordinator_pb2.NodeStatus(last_seen_s=0.4)
    status.node.node_id, status.node.name, status.node.state = f"id-{name}", name, state
    status.node.hardware.total_memory_bytes = 192 * GIB
    if sampled:
        s = status.sample
        s.cpu_percent, s.memory_total_bytes, s.memory_used_bytes = 71.0, 192 * GIB, 151 * GIB
        s.swap_used_bytes, s.memory_pressure = 3 * GIB, "warn"
        if gpu is not None:
            s.gpu_utilization_percent = gpu
        if layers is not None:
            s.shard.start_layer, s.shard.end_layer = layers
            s.shard.progress = progress
            s.runner.tokens_per_s = 1234.5
    if layers is not None:
        status.node.shard.start_layer, status.node.shard.end_layer = layers
        if state != STATES.NODE_STATE_LOADING:  # every stage serving: the pipeline's figure
            status.pipeline_tokens_per_s = 1234.5
    if rtt is not None:
        status.heartbeat_rtt_s = rtt
    return status


def busy_cluster() -> coordinator_pb2.StatusReply:
    reply = coordinator_pb2.StatusReply(
        cluster="lab", model="mlx-community/Llama-3.3-70B-Instruct-4bit", serving=True,
        tokens_per_s=1234.5, ttft_s=0.321, requests_in_flight=12, requests_total=123456,
        requests_failed=7, load_id="abc", timestamp=1_700_000_000.0,
    )  # fmt: skip
    reply.nodes.extend(
        [
            node_status("mac-studio-ultra-lab-room-3", STATES.NODE_STATE_SERVING,
                        layers=(0, 120), gpu=99.0, rtt=0.1234),
            node_status("mini-2", STATES.NODE_STATE_DEGRADED, layers=(120, 240), rtt=0.9),
            node_status("mbp", STATES.NODE_STATE_LOADING, layers=(240, 241), progress=0.37),
            node_status("old-mini", STATES.NODE_STATE_LOST, sampled=False),
            node_status("spare", STATES.NODE_STATE_DISCOVERED, gpu=0.0),
        ]
    )  # fmt: skip
    return reply


def render(reply: coordinator_pb2.StatusReply, width: int) -> list[str]:
    console = Console(
        width=width, record=True, force_terminal=True, color_system="truecolor", file=io.StringIO()
    )
    print_status(reply, console)
    return console.export_text(styles=False).splitlines()


@pytest.mark.parametrize("width", [80, 60, 44])
def test_each_node_is_one_row_that_fits_the_terminal(width: int) -> None:
    reply = busy_cluster()
    lines = render(reply, width)
    assert max(len(line) for line in lines) <= width
    header = lines[0].split()
    assert header[:2] == ["node", "state"]
    rows = lines[1 : 1 + len(reply.nodes)]
    # One line per node, in order, each starting with its (maybe shortened) name.
    for row, status in zip(rows, reply.nodes, strict=True):
        assert status.node.name.startswith(row.split()[0].rstrip("…"))
        assert (
            row.split()[1]
            == coordinator_pb2.NodeState.Name(status.node.state).split("_")[-1].lower()
        )
    summary = lines[1 + len(reply.nodes)]
    assert summary.startswith("serving Llama-3.3-70B-Instruct-4bit")
    if width >= 60:
        assert "1234.5 tok/s" in summary


def test_at_80_columns_the_figures_that_matter_stay() -> None:
    lines = render(busy_cluster(), 80)
    header = lines[0].split()
    assert header == ["node", "state", "layers", "memory", "swap", "cpu", "gpu", "tok/s", "rtt"]
    studio, mini, mbp, lost, spare = lines[1:6]
    assert "0-119" in studio and "151/192 GiB" in studio and "99%" in studio
    assert mini.split()[-5:] == ["71%", "n/a", "1234.5", "900.0", "ms"]  # no GPU reader: n/a
    assert " 0% " in spare  # a reader that says 0% shows 0%
    assert "loading 37%" in mbp and " 240 " in mbp
    assert lost.split() == ["old-mini", "lost", "-", "n/a", "n/a", "n/a", "n/a", "-", "n/a"]
    assert any(line.startswith("mini-2: heartbeat RTT 900 ms") for line in lines)


def test_a_lost_node_shows_the_layers_of_the_plan_in_force_and_no_figures() -> None:
    reply = busy_cluster()
    reply.plan.add(node_id="id-old-mini", name="old-mini", start_layer=241, end_layer=300)
    lost = render(reply, 80)[4]
    assert lost.split() == ["old-mini", "lost", "241-299", "n/a", "n/a", "n/a", "n/a", "-", "n/a"]
    del reply.plan[:]  # re-formed without it
    lost = render(reply, 80)[4]
    assert lost.split() == ["old-mini", "lost", "-", "n/a", "n/a", "n/a", "n/a", "-", "n/a"]


def test_wide_terminals_get_every_column() -> None:
    lines = render(busy_cluster(), 132)
    assert lines[0].split() == [
        "node",
        "state",
        "layers",
        "memory",
        "swap",
        "cpu",
        "gpu",
        "tok/s",
        "rtt",
    ]
    assert "123.4 ms" in lines[1]
    assert lines[1].startswith("mac-studio-ultr… serving")  # names stop at 16 columns


def test_a_cluster_that_is_not_serving_says_why_in_full() -> None:
    reply = coordinator_pb2.StatusReply(
        model="pomona-demo",
        serving=False,
        problem="model needs 140 GB; the cluster has 96 GB usable: add a worker or a smaller model",
    )
    lines = render(reply, 80)
    assert lines[-3].startswith("not serving pomona-demo · 0.0 tok/s · TTFT n/a")
    assert " ".join(lines[-2:]) == f"why: {reply.problem}"


def test_json_has_the_schema_key_and_proto_field_names() -> None:
    doc = status_json(busy_cluster())
    assert doc["schema"] == SCHEMA == "pomona.status/v1"
    assert list(doc)[0] == "schema"
    assert set(doc) >= {
        "cluster", "model", "serving", "problem", "nodes", "plan", "load_id", "tokens_per_s",
        "ttft_s", "requests_in_flight", "requests_total", "requests_failed", "timestamp",
    }  # fmt: skip
    node = doc["nodes"][0]
    assert set(node) >= {"node", "sample", "heartbeat_rtt_s", "last_seen_s"}
    assert node["node"]["state"] == "NODE_STATE_SERVING"
    assert node["sample"]["memory_used_bytes"] == str(151 * GIB)  # 64-bit ints are strings
    assert node["sample"]["gpu_utilization_percent"] == 99.0
    assert "gpu_utilization_percent" not in doc["nodes"][1]["sample"]  # n/a: absent
    assert "gpu_power_watts" not in node["sample"]
    assert "heartbeat_rtt_s" not in doc["nodes"][3] and "sample" not in doc["nodes"][3]
    assert doc["requests_total"] == "123456"
    json.dumps(doc)


def test_json_without_ttft_leaves_it_out() -> None:
    doc = status_json(coordinator_pb2.StatusReply(model="m"))
    assert "ttft_s" not in doc and doc["tokens_per_s"] == 0 and doc["nodes"] == []


def test_status_view_shows_an_error_without_a_reply() -> None:
    console = Console(width=80, record=True)
    console.print(status_view(None, 80, header="pomona status", error="cannot reach x:1"))
    assert console.export_text().splitlines() == ["pomona status", "cannot reach x:1"]


def test_node_sample_fields_the_table_reads_exist() -> None:
    # The table reads these by name; a renamed proto field must fail here, not at a user.
    fields = set(worker_pb2.NodeSample.DESCRIPTOR.fields_by_name)
    assert {
        "cpu_percent",
        "memory_used_bytes",
        "swap_used_bytes",
        "gpu_utilization_percent",
    } <= fields
