"""Which worker holds which layers: the coordinator's one placement function.

Converts what workers report (protobuf) into the planner's plain values and
asks the planner; an explicit ``--layers`` split skips the planner's choice
of nodes but is still checked against every node's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pomona.coordinator.parallel import ParallelChoice, compare_parallel
from pomona.coordinator.planner import Link, NodeSpec, Plan, PlanError, plan
from pomona.model_profile import ModelProfile
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
    # A tensor parallel rank: a slice of every layer, from every tensor of the model.
    whole: bool = False


def node_spec(
    node_id: str, name: str, hw: worker_pb2.Hardware, address: str | None = None
) -> NodeSpec:
    """The planner's view of a worker, from the hardware it describes."""
    total = hw.total_memory_bytes
    in_use = max(0, total - hw.available_memory_bytes) if hw.available_memory_bytes else 0
    return NodeSpec(
        node_id=node_id,
        name=name or node_id,
        chip=hw.chip or None,
        total_memory_bytes=total,
        gpu_memory_limit_bytes=hw.gpu_memory_limit_bytes or None,
        memory_in_use_bytes=in_use,
        gpu_cores=hw.gpu_cores or None,
        bandwidth_gbs=hw.measured_bandwidth_gbs if hw.HasField("measured_bandwidth_gbs") else None,
        bandwidth_measured=hw.HasField("measured_bandwidth_gbs"),
        measured_tflops=hw.measured_tflops if hw.HasField("measured_tflops") else None,
        rdma=hw.rdma,
        address=address,
    )


def place(
    info: worker_pb2.ModelInfo,
    nodes: Sequence[worker_pb2.DescribeReply],
    *,
    layers: Sequence[int] = (),
    context: int = 8192,
    concurrency: int = 1,
    objective: str = "latency",
    links: Sequence[Link] = (),
    draft_bytes: int = 0,
) -> tuple[list[Assignment], Plan | None]:
    """Ranges in ring order for the model described by ``info`` (and a draft model of
    ``draft_bytes`` on the head's node)."""
    profile = ModelProfile.from_json(info.profile_json)
    specs = [node_spec(d.node_id, d.name, d.hardware) for d in nodes]
    context = min(context, profile.max_context or context)
    if layers:
        return manual_split(profile, specs, layers, info.model, draft_bytes), None
    try:
        result = plan(
            profile,
            specs,
            context_length=context,
            concurrency=concurrency,
            objective=objective,  # type: ignore[arg-type]
            links=links,
            draft_bytes=draft_bytes,
        )
    except PlanError as e:
        draft = " with its draft model" if draft_bytes else ""
        raise PlacementError(f"{info.model}{draft} does not fit: {e}") from e
    return [
        Assignment(s.node_id, s.name, s.start_layer, s.end_layer, s.weights_bytes)
        for s in result.stages
    ], result


def manual_split(
    profile: ModelProfile,
    nodes: Sequence[NodeSpec],
    layers: Sequence[int],
    model: str,
    draft_bytes: int = 0,
) -> list[Assignment]:
    """An operator's split, in node order, checked against memory (the head's
    node also holds a draft model of ``draft_bytes``, weights and KV)."""
    n = profile.num_layers
    if len(layers) != len(nodes) or sum(layers) != n or min(layers) < 1:
        raise PlacementError(
            f"--layers {','.join(map(str, layers))} must give each of the {len(nodes)} "
            f"workers at least one layer and add up to {model}'s {n} layers"
        )
    out = []
    start = 0
    per_layer = profile.layer_weight_bytes
    for i, (node, count) in enumerate(zip(nodes, layers, strict=True)):
        end = start + count
        weights = sum(per_layer[start:end])
        if i == 0:
            weights += profile.embedding_bytes
        if i == len(nodes) - 1:
            weights += profile.head_bytes + (
                profile.embedding_bytes if profile.tied_embeddings and i else 0
            )
        usable = node.gpu_memory_limit_bytes or node.total_memory_bytes
        draft = draft_bytes if i == 0 else 0
        if weights + draft > usable:
            with_draft = f" and the draft model ({format_bytes(draft)})" if draft else ""
            raise PlacementError(
                f"{node.name} would hold layers [{start}, {end}) of {model}{with_draft}: "
                f"{format_bytes(weights + draft)}, but it has {format_bytes(usable)} usable"
            )
        out.append(Assignment(node.node_id, node.name, start, end, weights))
        start = end
    return out


def choose_split(
    info: worker_pb2.ModelInfo,
    nodes: Sequence[worker_pb2.DescribeReply],
    pipeline: list[Assignment],
    *,
    parallel: str = "auto",
    layers: Sequence[int] = (),
    context: int = 8192,
    concurrency: int = 1,
    objective: str = "latency",
    links: Sequence[Link] = (),
) -> tuple[list[Assignment], ParallelChoice]:
    """The pipeline's ``pipeline`` assignments, or every node's tensor slice.

    ``parallel``: "pipeline", "tensor", or "auto" (tensor where mlx-lm can shard
    the model and the planner predicts it decodes faster at the nodes' link class).
    """
    if parallel == "pipeline":
        return pipeline, ParallelChoice("pipeline", "asked for (--parallel pipeline)")
    if layers:
        if parallel == "tensor":
            raise PlacementError(
                "--layers splits layers between workers, which --parallel tensor does not: "
                "drop one of them"
            )
        return pipeline, ParallelChoice("pipeline", "--layers gives the split")
    if len(nodes) == 1:
        return pipeline, ParallelChoice("pipeline", "one worker: nothing to split")
    profile = ModelProfile.from_json(info.profile_json)
    specs = [node_spec(d.node_id, d.name, d.hardware) for d in nodes]
    context = min(context, profile.max_context or context)
    try:
        found = compare_parallel(
            profile,
            specs,
            parallel,
            links=links,
            context_length=context,
            concurrency=concurrency,
            objective=objective,
        )
    except PlanError as e:
        raise PlacementError(f"{info.model}: {e}") from e
    choice, tensor = found.choice, found.tensor
    if choice.mode == "pipeline" or tensor is None:
        return pipeline, choice
    return [
        Assignment(r.node_id, r.name, 0, profile.num_layers, r.weights_bytes, whole=True)
        for r in tensor.ranks
    ], choice
