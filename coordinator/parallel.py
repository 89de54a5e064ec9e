"""Pipeline or tensor parallelism: what each would cost, and which to use.

Pure logic beside the planner (no sockets, no MLX evaluation). Pipeline
parallelism gives each node a range of layers: one hop per stage per token.
Tensor parallelism gives every node a slice of every layer (mlx-lm's
``shard()``): each node reads 1/N of the layers per token, but every layer
costs two collectives (after attention and after the MLP), so it only pays
where a collective is cheap — RDMA (JACCL, ~30 µs) rather than TCP (~0.3 ms).
See docs/planning.md for the formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from pomona.config import DEFAULT_CONTEXT
from pomona.coordinator.memory_fit import (
    DEFAULT_OS_RESERVE_BYTES,
    Demand,
    NodeBudget,
    resolve_node,
)
from pomona.coordinator.planner import (
    DEFAULT_LINK,
    DEFAULT_PROMPT_TOKENS,
    Link,
    NodeSpec,
    Plan,
    PlanError,
    Prediction,
    decode_bytes_per_s,
    plan,
    prefill_flops_per_s,
)
from pomona.model_profile import ModelProfile
from pomona.units import format_bytes

PARALLEL_CHOICES = ("auto", "pipeline", "tensor")
# One message between two Macs: JACCL over Thunderbolt 5 RDMA, and TCP through
# MLX's ring over the same cable (0.3-0.6 ms; the planner's default link).
RDMA_LINK = Link("", "", latency_ms=0.03, bandwidth_gbs=6.0, kind="RDMA (JACCL)")
TCP_LINK = replace(DEFAULT_LINK, kind="TCP (MLX's ring)")


@dataclass(frozen=True)
class TensorRank:
    node_id: str
    name: str
    weights_bytes: int  # its slice of the layers, plus the unsharded embedding and head
    kv_bytes: int
    activation_bytes: int
    budget_bytes: int


@dataclass(frozen=True)
class TensorPlan:
    """Every node of ``ranks`` holds a 1/N slice of every layer."""

    ranks: tuple[TensorRank, ...]
    link: Link
    decode_tokens_per_s: float  # per stream
    aggregate_tokens_per_s: float
    ttft_s: float
    compute_seconds: float  # per decode step, the slowest rank's reads
    collective_seconds: float  # per decode step, all collectives
    layers: int  # two collectives each per step

    @property
    def world_size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class ParallelChoice:
    mode: str  # "pipeline" or "tensor"
    reason: str


def link_class(nodes: Sequence[NodeSpec], links: Sequence[Link] = ()) -> Link:
    """The link a collective among ``nodes`` crosses: the slowest measured one, else
    RDMA when every node has it, else TCP."""
    ids = {n.node_id for n in nodes}
    measured = [link for link in links if link.a in ids and link.b in ids]
    if measured:
        return max(measured, key=lambda link: link.latency_ms)
    return RDMA_LINK if nodes and all(n.rdma for n in nodes) else TCP_LINK


def collective_seconds(ranks: int, link: Link, payload_bytes: float) -> float:
    """One all_sum round a ring: 2 (N - 1) messages of a 1/N share of the payload."""
    if ranks < 2:
        return 0.0
    return (
        2
        * (ranks - 1)
        * (link.latency_ms / 1e3 + payload_bytes / ranks / (link.bandwidth_gbs * 1e9))
    )


def tensor_refusal(profile: ModelProfile, ranks: int) -> str:
    """Why ``profile`` cannot be cut into ``ranks`` tensor slices; "" when it can."""
    if not profile.tensor_shardable:
        return (
            f"mlx-lm's {profile.model_type} model has no shard(): it cannot be split by "
            "tensor parallelism"
        )
    bad = [w for w in profile.tensor_widths if w % ranks]
    if bad:
        widths = ", ".join(map(str, profile.tensor_widths))
        return (
            f"{profile.model_type}'s heads, KV heads and MLP width ({widths}) "
            f"do not all divide among {ranks} ranks"
        )
    return ""


def _rank_demand(d: Demand, ranks: int) -> tuple[int, int, int]:
    """Weights, KV cache and activations of one tensor rank.

    mlx-lm's shard() splits every layer's projections (and so the KV heads) into N;
    it shards neither the embedding nor the head, which every rank holds whole.
    """
    weights = d.weights[-1] // ranks + d.fixed_weights(0, 1)
    kv = d.kv[-1] // ranks
    return weights, kv, d.fixed(0, 1) - d.fixed_weights(0, 1)


def _timing(
    group: Sequence[NodeBudget], d: Demand, link: Link, prompt: int
) -> tuple[float, float, float]:
    """Decode compute and collectives per step, and time to first token."""
    p, n = d.profile, len(group)
    read = (d.decode_read[-1] + d.kv[-1]) / n + p.head_bytes + p.embedding_bytes * p.tied_embeddings
    compute = max(read / decode_bytes_per_s(node) for node in group)
    # Two all_sums per layer of the step's hidden states, and the step's control vector.
    width = p.hidden_size * p.dtype_bytes
    calls = 2 * p.num_layers
    collectives = calls * collective_seconds(n, link, d.concurrency * width)
    collectives += collective_seconds(n, link, 1024)
    flops = 2 * prompt * p.active_params + 2 * prompt * prompt * p.hidden_size * p.num_layers
    prefill = max(flops / n / prefill_flops_per_s(node) for node in group)
    ttft = prefill + calls * collective_seconds(n, link, prompt * width)
    return compute, collectives, ttft


def plan_tensor(
    profile: ModelProfile,
    nodes: Sequence[NodeSpec],
    *,
    links: Sequence[Link] = (),
    context_length: int = DEFAULT_CONTEXT,
    concurrency: int = 1,
    objective: str = "latency",
    os_reserve_bytes: int = DEFAULT_OS_RESERVE_BYTES,
    prompt_tokens: int | None = None,
    world_size: int | None = None,
) -> TensorPlan:
    """The best tensor parallel group of ``nodes`` (2 or more, or ``world_size``), or
    PlanError saying why there is none.

    latency: the group with the fastest predicted decode; throughput: the largest
    group that fits. Nodes join fastest memory first.
    """
    if len(nodes) < 2:
        raise PlanError("tensor parallelism needs at least 2 nodes")
    resolved = sorted((resolve_node(n, os_reserve_bytes) for n in nodes), key=lambda n: n.key)
    d = Demand(profile, context_length, concurrency, False)
    prompt = prompt_tokens or min(context_length, DEFAULT_PROMPT_TOKENS)
    sizes = [world_size] if world_size else list(range(2, len(resolved) + 1))
    problems: list[str] = []
    best: TensorPlan | None = None
    for k in sizes:
        if k < 2 or k > len(resolved):
            problems.append(f"{k} ranks: there are {len(resolved)} nodes")
            continue
        refusal = tensor_refusal(profile, k)
        if refusal:
            problems.append(refusal)
            continue
        group = resolved[:k]
        weights, kv, activation = _rank_demand(d, k)
        short = [n for n in group if weights + kv + activation > n.budget]
        if short:
            problems.append(
                f"{k} ranks: each needs {format_bytes(weights + kv + activation)} "
                f"({format_bytes(weights)} of weights, the embedding and head whole on every "
                f"rank), but {short[0].spec.name} has {format_bytes(short[0].budget)}"
            )
            continue
        link = link_class([n.spec for n in group], links)
        compute, collectives, ttft = _timing(group, d, link, prompt)
        step = compute + collectives
        candidate = TensorPlan(
            ranks=tuple(
                TensorRank(n.spec.node_id, n.spec.name, weights, kv, activation, n.budget)
                for n in group
            ),
            link=link,
            decode_tokens_per_s=1.0 / step,
            aggregate_tokens_per_s=concurrency / step,
            ttft_s=ttft,
            compute_seconds=compute,
            collective_seconds=collectives,
            layers=profile.num_layers,
        )
        if (
            best is None
            or objective == "throughput"
            or candidate.decode_tokens_per_s > best.decode_tokens_per_s
        ):
            best = candidate
    if best is None:
        raise PlanError("no tensor parallel group fits: " + "; ".join(problems))
    return best


def predict_tensor(
    profile: ModelProfile,
    nodes: Sequence[NodeSpec],
    *,
    context_length: int,
    prompt_tokens: int,
    concurrency: int = 1,
    links: Sequence[Link] = (),
) -> Prediction:
    """What ``plan_tensor`` predicts for a tensor group already placed on ``nodes``
    (collectives on the slowest of ``links`` among them, else the link class)."""
    if len(nodes) < 2:
        raise ValueError("a tensor parallel group has at least 2 nodes")
    group = [resolve_node(n) for n in nodes]
    d = Demand(profile, context_length, concurrency, False)
    compute, collectives, ttft = _timing(group, d, link_class(nodes, links), prompt_tokens)
    step = compute + collectives
    return Prediction(1.0 / step, concurrency / step, ttft)


def is_tensor_layout(num_layers: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether every rank holds every layer: a tensor parallel group."""
    return len(ranges) > 1 and all(r == (0, num_layers) for r in ranges)


def pipeline_at_link(
    profile: ModelProfile,
    nodes: Sequence[NodeSpec],
    link: Link,
    **kwargs: object,
) -> Plan:
    """The planner's pipeline over ``nodes`` with every hop on ``link``."""
    links = [
        Link(a.node_id, b.node_id, link.latency_ms, link.bandwidth_gbs, link.kind)
        for i, a in enumerate(nodes)
        for b in nodes[i + 1 :]
    ]
    return plan(profile, nodes, links=links, **kwargs)  # type: ignore[arg-type]


def choose_parallel(
    mode: str, pipeline: Plan | None, tensor: TensorPlan | None, why_not_tensor: str = ""
) -> ParallelChoice:
    """``mode`` ("auto", "pipeline" or "tensor") resolved, and why.

    auto takes tensor only where its predicted single-stream decode beats the
    pipeline's; "tensor" without a tensor plan is an error (``why_not_tensor``).
    """
    if mode not in PARALLEL_CHOICES:
        raise ValueError(f"--parallel {mode!r} is not one of {', '.join(PARALLEL_CHOICES)}")
    if mode == "pipeline":
        return ParallelChoice("pipeline", "asked for (--parallel pipeline)")
    if tensor is None:
        if mode == "tensor":
            raise PlanError(f"--parallel tensor: {why_not_tensor}")
        return ParallelChoice("pipeline", f"tensor parallelism is not possible: {why_not_tensor}")
    if mode == "tensor":
        return ParallelChoice("tensor", "asked for (--parallel tensor)")
    if pipeline is None or tensor.decode_tokens_per_s > pipeline.decode_tokens_per_s:
        return ParallelChoice(
            "tensor",
            f"predicted {tensor.decode_tokens_per_s:.1f} tok/s on {tensor.world_size} ranks over "
            f"{tensor.link.kind} against the pipeline's "
            + (f"{pipeline.decode_tokens_per_s:.1f}" if pipeline else "none"),
        )
    return ParallelChoice(
        "pipeline",
        f"predicted {pipeline.decode_tokens_per_s:.1f} tok/s against tensor's "
        f"{tensor.decode_tokens_per_s:.1f} over {tensor.link.kind} "
        f"({tensor.link.latency_ms * 1e3:.0f} µs a message, {2 * tensor.layers + 1} "
        "collectives a token)",
    )


@dataclass(frozen=True)
class Comparison:
    """Pipeline and tensor parallelism over the same nodes and link class."""

    choice: ParallelChoice
    link: Link
    pipeline: Plan | None
    tensor: TensorPlan | None
    why_not_tensor: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.choice.mode,
            "reason": self.choice.reason,
            "link": asdict(self.link),
            "pipeline_tokens_per_s": self.pipeline.decode_tokens_per_s if self.pipeline else None,
            "tensor": asdict(self.tensor) if self.tensor else None,
            "why_not_tensor": self.why_not_tensor,
        }


def compare_parallel(
    profile: ModelProfile,
    nodes: Sequence[NodeSpec],
    mode: str,
    *,
    links: Sequence[Link] = (),
    context_length: int = DEFAULT_CONTEXT,
    concurrency: int = 1,
    objective: str = "latency",
    prompt_tokens: int | None = None,
) -> Comparison:
    """Both predictions at the nodes' link class (or over ``links`` where measured), and
    ``mode`` resolved by them; PlanError when ``mode`` is "tensor" and no tensor group
    is possible."""
    options: dict[str, Any] = {
        "context_length": context_length,
        "concurrency": concurrency,
        "objective": objective,
        "prompt_tokens": prompt_tokens,
    }
    tensor, why_not = None, ""
    try:
        tensor = plan_tensor(profile, nodes, links=links, **options)
    except PlanError as e:
        why_not = str(e)
    link = tensor.link if tensor is not None else link_class(nodes, links)
    try:
        # Measured links price each hop of the pipeline; otherwise every hop is the class's.
        pipeline: Plan | None = (
            plan(profile, nodes, links=links, **options)
            if links
            else pipeline_at_link(profile, nodes, link, **options)
        )
    except PlanError:
        pipeline = None
    choice = choose_parallel(mode, pipeline, tensor, why_not)
    return Comparison(choice, link, pipeline, tensor, why_not)


__all__ = [
    "Comparison",
    "compare_parallel",
    "PARALLEL_CHOICES",
    "ParallelChoice",
    "TensorPlan",
    "choose_parallel",
    "collective_seconds",
    "link_class",
    "is_tensor_layout",
    "pipeline_at_link",
    "predict_tensor",
    "plan_tensor",
    "tensor_refusal",
]
