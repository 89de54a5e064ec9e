"""Which worker holds which layers: the coordinator's one placement function.

Converts what workers report (protobuf) into plain values, then splits the
model's layers over the workers in proportion to the memory each may use,
checking that every range fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pomona.coordinator.planner import split_layers
from pomona.units import format_bytes
from pomona.v1 import worker_pb2


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Assignment:
    node_id: str
    name: str
    start: int
    end: int  # exclusive
    weights_bytes: int


@dataclass(frozen=True)
class NodeMemory:
    node_id: str
    name: str
    usable_bytes: int


def node_memory(d: worker_pb2.DescribeReply) -> NodeMemory:
    hw = d.hardware
    limit = hw.gpu_memory_limit_bytes or hw.total_memory_bytes
    return NodeMemory(d.node_id, d.name, min(limit, hw.available_memory_bytes or limit))


def place(
    info: worker_pb2.ModelInfo,
    nodes: Sequence[worker_pb2.DescribeReply],
    layers: Sequence[int] = (),
) -> list[Assignment]:
    return split(
        list(info.layer_bytes),
        info.other_bytes,
        [node_memory(d) for d in nodes],
        info.model,
        layers,
    )


def split(
    layer_bytes: list[int],
    other_bytes: int,
    nodes: Sequence[NodeMemory],
    model: str,
    layers: Sequence[int] = (),
) -> list[Assignment]:
    """Contiguous ranges in node order, sized by memory (or by ``layers``)."""
    n = len(layer_bytes)
    if not nodes:
        raise PlacementError("no workers to place the model on")
    need = sum(layer_bytes) + other_bytes
    have = sum(m.usable_bytes for m in nodes)
    if need > have:
        raise PlacementError(
            f"{model} needs {format_bytes(need)} for its weights but the {len(nodes)} workers "
            f"have {format_bytes(have)} usable: add {format_bytes(need - have)} "
            "(another machine) or use a smaller or lower-bit model"
        )
    if layers:
        if len(layers) != len(nodes) or sum(layers) != n or min(layers) < 1:
            raise PlacementError(
                f"--layers {','.join(map(str, layers))} must give each of the {len(nodes)} "
                f"workers at least one layer and add up to the model's {n} layers"
            )
        counts = list(layers)
    else:
        if len(nodes) > n:
            nodes = sorted(nodes, key=lambda m: -m.usable_bytes)[:n]
        counts = split_layers(n, [m.usable_bytes for m in nodes])
    out = []
    start = 0
    for i, (node, count) in enumerate(zip(nodes, counts, strict=True)):
        end = start + count
        weights = sum(layer_bytes[start:end]) + (other_bytes if i in (0, len(nodes) - 1) else 0)
        if weights > node.usable_bytes:
            raise PlacementError(
                f"{node.name} would hold layers [{start}, {end}) of {model}: "
                f"{format_bytes(weights)}, but it has {format_bytes(node.usable_bytes)} usable"
            )
        out.append(Assignment(node.node_id, node.name, start, end, weights))
        start = end
    return out
