"""Terminal and JSON renderings of cluster state for the CLI."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from pomona.links_view import link_lines
from pomona.units import format_bytes
from pomona.v1 import coordinator_pb2, worker_pb2


def node_state(value: int) -> str:
    return coordinator_pb2.NodeState.Name(value).removeprefix("NODE_STATE_").lower()


def shard_state(value: int) -> str:
    return worker_pb2.ShardState.Name(value).removeprefix("SHARD_STATE_").lower()


def nodes_json(reply: coordinator_pb2.ListNodesReply) -> dict[str, Any]:
    return MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_nodes(reply: coordinator_pb2.ListNodesReply, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(nodes_json(reply), indent=2))
        return
    console = Console()
    table = Table(title=f"cluster {reply.cluster} · model {reply.model}", title_justify="left")
    for column in ("name", "state", "address", "chip", "memory", "layers"):
        table.add_column(column, no_wrap=column in ("name", "state", "layers"))
    for n in reply.nodes:
        shard = n.shard
        layers = (
            f"{shard.start_layer}-{shard.end_layer - 1}"
            if shard.end_layer > shard.start_layer
            else "-"
        )
        table.add_row(
            n.name,
            node_state(n.state),
            n.address,
            n.hardware.chip or "n/a",
            format_bytes(n.hardware.total_memory_bytes),
            layers,
        )
    console.print(table)
    if reply.serving:
        serving = [n for n in reply.nodes if n.state == coordinator_pb2.NODE_STATE_SERVING]
        backends = {n.shard.backend for n in serving if n.shard.backend}
        over = f" over {backends.pop()}" if len(backends) == 1 and len(serving) > 1 else ""
        console.print(f"serving {reply.model} on {len(serving)} nodes{over}")
    else:
        console.print(f"not serving: {reply.problem}")
    for line in link_lines(reply.links):
        console.print(line)
