"""Placement: which node holds which contiguous layers, and what that will cost.

A pure function of a model profile and node profiles: no sockets, no processes, no
MLX evaluation. See docs/planning.md for the rules and the formulas.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pomona.config import DEFAULT_CONTEXT
from pomona.coordinator.memory_fit import (
    DEFAULT_OS_RESERVE_BYTES,
    FLOPS_PER_GPU_CORE,
    Demand,
    NodeBudget,
    explain_refusal,
    fit_stages,
    resolve_node,
    split_layers,
)
from pomona.model_profile import ModelProfile

__all__ = [
    "Link",
    "NodeSpec",
    "Plan",
    "PlanError",
    "Prediction",
    "Stage",
    "plan",
    "predict",
    "split_layers",
]

Objective = Literal["latency", "throughput"]
OBJECTIVES: tuple[str, ...] = ("latency", "throughput")
MEMORY_EFFICIENCY = 0.75  # share of the published bandwidth decode actually reaches
# Share of FLOPS_PER_GPU_CORE that prefill reaches, calibrated on published mlx-lm runs
# of Llama-3.x-70B 4-bit with a 4K prompt: ~170 tok/s on an M3 Ultra (80-core GPU),
# ~83 tok/s on an M3 Max (40-core): both ~0.30 TFLOPS per core (docs/planning.md).
COMPUTE_EFFICIENCY = 0.85
DEFAULT_PROMPT_TOKENS = 512
MAX_GROUPS = 2048  # node subsets the latency search tries before it goes greedy
MAX_PERMUTED = 5  # ring orders are searched exhaustively up to this many nodes


class PlanError(ValueError):
    """The model does not fit: the message says by how much and what would make it fit."""

    def __init__(
        self, message: str, *, shortfall_bytes: int = 0, suggestions: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes
        self.suggestions = suggestions


@dataclass(frozen=True)
class NodeSpec:
    """One machine as the planner sees it. None means unknown: derived, and said so."""

    node_id: str
    name: str
    chip: str | None
    total_memory_bytes: int
    gpu_memory_limit_bytes: int | None = None  # None -> 75% of RAM (macOS default)
    memory_in_use_bytes: int = 0  # used by other processes
    bandwidth_gbs: float | None = None  # None -> chip table, else an assumed default
    gpu_cores: int | None = None
    # What a worker measured (worker/bandwidth.py), where Apple's table lacks its chip:
    # streaming bandwidth (then in bandwidth_gbs) and dense matmul throughput.
    bandwidth_measured: bool = False
    measured_tflops: float | None = None  # None -> GPU cores x FLOPS_PER_GPU_CORE
    rdma: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if self.total_memory_bytes <= 0:
            raise ValueError(f"node {self.name!r}: total memory must be positive")
        if self.memory_in_use_bytes < 0:
            raise ValueError(f"node {self.name!r}: memory in use cannot be negative")
        if self.bandwidth_gbs is not None and self.bandwidth_gbs <= 0:
            raise ValueError(f"node {self.name!r}: bandwidth must be positive or None")
        if self.bandwidth_measured and self.bandwidth_gbs is None:
            raise ValueError(f"node {self.name!r}: a measured bandwidth needs bandwidth_gbs")
        if self.measured_tflops is not None and not self.measured_tflops > 0:
            raise ValueError(f"node {self.name!r}: measured TFLOPS must be positive or None")


@dataclass(frozen=True)
class Link:
    """A measured link between two nodes (either direction)."""

    a: str
    b: str
    latency_ms: float
    bandwidth_gbs: float
    kind: str = "ethernet"


# Used for unmeasured pairs: 10 GbE with the latency of TCP through MLX's ring backend.
DEFAULT_LINK = Link("", "", latency_ms=0.3, bandwidth_gbs=1.25, kind="10 GbE ethernet")


@dataclass(frozen=True)
class Stage:
    node_id: str
    name: str
    chip: str | None
    start_layer: int
    end_layer: int  # exclusive
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int
    budget_bytes: int
    free_after_load_bytes: int
    holds_embedding: bool
    holds_head: bool
    bandwidth_gbs: float
    bandwidth_assumed: bool
    gpu_cores: int
    gpu_cores_assumed: bool
    decode_seconds: float
    share_of_time: float

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer


@dataclass(frozen=True)
class Plan:
    model: str
    precision: str
    objective: str
    context_length: int
    concurrency: int
    prompt_tokens: int
    stages: tuple[Stage, ...]
    backend: str  # "ring" or "jaccl"
    decode_tokens_per_s: float  # per stream
    aggregate_tokens_per_s: float
    ttft_s: float
    network_seconds: float  # per decode step, over all hops
    formula: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for stage, d in zip(self.stages, out["stages"], strict=True):
            d["num_layers"] = stage.num_layers
        return out


def _link(links: dict[frozenset[str], Link], a: str, b: str) -> Link:
    return links.get(frozenset((a, b)), DEFAULT_LINK)


def _hop(link: Link, payload_bytes: float) -> float:
    return link.latency_ms / 1e3 + payload_bytes / (link.bandwidth_gbs * 1e9)


def decode_bytes_per_s(node: NodeBudget) -> float:
    """The rate decode reads weights and KV at on ``node``.

    A datasheet's bandwidth is a peak decode reaches MEMORY_EFFICIENCY of; a worker's
    measured figure is already what MLX reaches streaming on it, as decode streams.
    """
    return node.bandwidth_gbs * 1e9 * (1.0 if node.bandwidth_measured else MEMORY_EFFICIENCY)


def prefill_flops_per_s(node: NodeBudget) -> float:
    """The rate prefill computes at on ``node``: COMPUTE_EFFICIENCY of GPU cores at their
    nominal rate, or all of a measured matmul rate (prefill is large matmuls)."""
    return node.flops * (1.0 if node.flops_measured else COMPUTE_EFFICIENCY)


def _ring_cost(order: Iterable[NodeBudget], links: dict[frozenset[str], Link]) -> float:
    """Latency around the ring: every hop, and the last back to the first."""
    ids = [n.spec.node_id for n in order]
    return sum(_hop(_link(links, a, b), 0) for a, b in zip(ids, ids[1:] + ids[:1], strict=True))


def _ring_order(group: Sequence[NodeBudget], links: dict[frozenset[str], Link]) -> list[NodeBudget]:
    order = sorted(group, key=lambda n: n.key)
    if not links or len(order) < 3 or len(order) > MAX_PERMUTED:
        return order
    # the first of the cheapest orders: ties keep the ranked order (determinism)
    return list(min(itertools.permutations(order), key=lambda o: _ring_cost(o, links)))


@dataclass(frozen=True)
class _Prefill:
    """A prompt of `tokens` tokens: FLOPs and bytes read per layer, as prefix sums."""

    tokens: int
    flops: list[float]
    read: list[float]

    @classmethod
    def of(cls, profile: ModelProfile, tokens: int) -> _Prefill:
        flops = [_prefill_flops(profile, j, tokens) for j in range(profile.num_layers)]
        read = [profile.layer_active_bytes(j, tokens) for j in range(profile.num_layers)]
        return cls(tokens, [0, *itertools.accumulate(flops)], [0, *itertools.accumulate(read)])


def _prefill_flops(profile: ModelProfile, layer: int, tokens: int) -> float:
    """2 x active params per token, plus causal attention: QK^T and AV over the tokens
    each one sees (its window at most), ~2 x tokens x seen x hidden size."""
    window = profile.layers[layer].kv_window
    seen = min(tokens, window) if window else tokens
    return 2 * tokens * profile.layer_active_params(layer) + 2 * tokens * seen * profile.hidden_size


@dataclass(frozen=True)
class _Timing:
    stage_seconds: tuple[float, ...]
    network_seconds: float
    ttft_s: float

    @property
    def step_seconds(self) -> float:
        return sum(self.stage_seconds) + self.network_seconds


def _timing(
    order: Sequence[NodeBudget],
    ends: Sequence[int],
    d: Demand,
    links: dict[frozenset[str], Link],
    prefill: _Prefill,
) -> _Timing:
    p, k, b = d.profile, len(order), d.concurrency
    stage, prompt = [], []
    for i, (node, start, end) in enumerate(zip(order, [0, *ends], ends, strict=False)):
        read = d.decode_read[end] - d.decode_read[start] + d.kv[end] - d.kv[start]
        if d.holds(i, k)[1]:
            read += p.head_bytes + p.embedding_bytes * p.tied_embeddings
        bandwidth = decode_bytes_per_s(node)
        stage.append(read / bandwidth)
        flops = prefill.flops[end] - prefill.flops[start]
        weights = prefill.read[end] - prefill.read[start]
        prompt.append(max(flops / prefill_flops_per_s(node), weights / bandwidth))
    ids = [n.spec.node_id for n in order]
    pairs = list(zip(ids, ids[1:], strict=False))
    width = p.hidden_size * p.dtype_bytes
    back = _hop(_link(links, ids[-1], ids[0]), 4 * b) if k > 1 else 0.0  # next tokens to head
    network = sum(_hop(_link(links, a, c), b * width) for a, c in pairs) + back
    carry = sum(_hop(_link(links, a, c), prefill.tokens * width) for a, c in pairs)
    return _Timing(tuple(stage), network, sum(prompt) + carry + back)


def _groups(nodes: Sequence[NodeBudget], num_layers: int, distinct: bool) -> list[list[NodeBudget]]:
    """Node subsets to try. Identical nodes are interchangeable, so subsets are chosen
    as counts per kind of node (the fastest-ranked nodes of a kind first)."""
    ordered = sorted(nodes, key=lambda n: n.key)
    kinds: dict[tuple[Any, ...], list[NodeBudget]] = {}
    for node in ordered:
        sig = (node.spec.node_id,) if distinct else (node.bandwidth_gbs, node.budget, node.flops)
        kinds.setdefault(sig + (node.spec.rdma,), []).append(node)
    if math.prod(len(v) + 1 for v in kinds.values()) > MAX_GROUPS:
        return [ordered[:k] for k in range(1, min(len(ordered), num_layers) + 1)]
    groups = []
    for counts in itertools.product(*(range(len(v) + 1) for v in kinds.values())):
        if 0 < sum(counts) <= num_layers:
            groups.append([n for c, v in zip(counts, kinds.values(), strict=True) for n in v[:c]])
    return groups


def _search(
    nodes: Sequence[NodeBudget],
    d: Demand,
    links: dict[frozenset[str], Link],
    objective: str,
    prefill: _Prefill,
) -> tuple[list[NodeBudget], list[int], _Timing] | None:
    """latency: the fastest predicted decode of all subsets that fit (ties: fewer nodes);
    throughput: the largest subset that fits, then the fastest."""
    groups = _groups(nodes, d.profile.num_layers, distinct=bool(links))
    if objective == "throughput":
        groups.sort(key=len, reverse=True)
    best, best_key = None, None
    for group in groups:
        if best is not None and objective == "throughput" and len(group) < len(best[0]):
            break
        order = _ring_order(group, links)
        ends = fit_stages(order, d)
        if ends is None:
            continue
        timing = _timing(order, ends, d, links, prefill)
        key = (timing.step_seconds, len(order), [n.key for n in order])
        if best_key is None or key < best_key:
            best, best_key = (order, ends, timing), key
    return best


def plan(
    profile: ModelProfile,
    nodes: Sequence[NodeSpec],
    *,
    links: Sequence[Link] = (),
    context_length: int = DEFAULT_CONTEXT,
    concurrency: int = 1,
    objective: Objective = "latency",
    os_reserve_bytes: int = DEFAULT_OS_RESERVE_BYTES,
    prompt_tokens: int | None = None,
    head_on_every_stage: bool = False,
    draft_bytes: int = 0,
) -> Plan:
    """Place `profile` on `nodes`, or raise PlanError saying what is missing.

    latency: the fewest, fastest nodes that fit (every hop costs decode latency).
    throughput: every node, layers balanced by memory bandwidth.
    head_on_every_stage: every stage holds embedding, norm and lm_head (as mlx-lm's
    own `pipeline()` keeps them), for runtimes where every rank computes logits.
    draft_bytes: a draft model's weights and KV (speculative decoding), held by
    the first stage's node.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if context_length < 1 or concurrency < 1:
        raise ValueError("context length and concurrency must be at least 1")
    if prompt_tokens is not None and not 1 <= prompt_tokens <= context_length:
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens does not fit a context of {context_length}: "
            "ask for a prompt of 1 to the context length"
        )
    if profile.max_context and context_length > profile.max_context:
        raise ValueError(
            f"a context of {context_length} tokens exceeds {profile.name}'s maximum of "
            f"{profile.max_context}: ask for {profile.max_context} or fewer"
        )
    if not nodes:
        raise PlanError("there are no nodes to plan on: start workers or describe nodes")
    if len({n.node_id for n in nodes}) != len(nodes):
        raise ValueError("node ids must be unique: give each node its own id")
    resolved = [resolve_node(n, os_reserve_bytes) for n in nodes]
    by_pair = {frozenset((link.a, link.b)): link for link in links}
    prefill = _Prefill.of(profile, prompt_tokens or min(context_length, DEFAULT_PROMPT_TOKENS))
    demand = Demand(profile, context_length, concurrency, head_on_every_stage, draft_bytes)
    found = _search(resolved, demand, by_pair, objective, prefill)
    if found is None:
        message, short, suggestions = explain_refusal(profile, resolved, demand, os_reserve_bytes)
        raise PlanError(message, shortfall_bytes=short, suggestions=suggestions)
    order, ends, timing = found
    notes = _notes(resolved, order, by_pair)
    if prompt_tokens is None:
        notes.append(
            f"TTFT predicted for a {prefill.tokens}-token prompt (the default): give "
            "prompt_tokens (--prompt-tokens) to predict yours"
        )
    return _make_plan(profile, order, ends, timing, demand, objective, prefill.tokens, notes)


def _notes(
    nodes: Sequence[NodeBudget], order: Sequence[NodeBudget], links: dict[frozenset[str], Link]
) -> list[str]:
    """What the prediction assumed, and nodes the plan leaves out."""
    assumed: dict[str, list[str]] = {}  # what was assumed -> the nodes it was assumed for
    for n in order:
        if n.bandwidth_assumed:
            assumed.setdefault(
                f"memory bandwidth of {n.spec.chip or 'an unknown chip'} assumed "
                f"{n.bandwidth_gbs:g} GB/s; give bandwidth_gbs to predict better",
                [],
            ).append(n.spec.name)
        if n.cores_assumption:
            assumed.setdefault(n.cores_assumption, []).append(n.spec.name)
        if n.memory_limit_assumed:
            assumed.setdefault(
                "GPU memory limit not given: assumed 75% of RAM (the macOS default); give "
                "gpu_memory_gb where iogpu.wired_limit_mb is raised",
                [],
            ).append(n.spec.name)
    notes = [f"{', '.join(names)}: {what}" for what, names in assumed.items()]
    ids = [n.spec.node_id for n in order]
    if len(ids) > 1 and any(frozenset(p) not in links for p in zip(ids, ids[1:], strict=False)):
        notes.append(
            f"links not measured: each hop assumed {DEFAULT_LINK.latency_ms:g} ms and "
            f"{DEFAULT_LINK.bandwidth_gbs:g} GB/s, as {DEFAULT_LINK.kind}"
        )
    if len(order) < len(nodes):
        notes.append(
            f"{len(nodes) - len(order)} of {len(nodes)} nodes left idle: fewer hops decode "
            "faster (--objective throughput uses them all)"
        )
    return notes


def _make_plan(
    profile: ModelProfile,
    order: Sequence[NodeBudget],
    ends: Sequence[int],
    timing: _Timing,
    d: Demand,
    objective: str,
    prompt: int,
    notes: Sequence[str],
) -> Plan:
    k, step = len(order), timing.step_seconds
    stages = []
    for i, (node, start, end) in enumerate(zip(order, [0, *ends], ends, strict=False)):
        weights = d.weights[end] - d.weights[start] + d.fixed_weights(i, k)
        kv = d.kv[end] - d.kv[start]
        activation = d.fixed(i, k) - d.fixed_weights(i, k)
        embedding, head = d.holds(i, k)
        stages.append(
            Stage(
                node_id=node.spec.node_id,
                name=node.spec.name,
                chip=node.spec.chip,
                start_layer=start,
                end_layer=end,
                weights_bytes=weights,
                kv_bytes=kv,
                activation_bytes=activation,
                budget_bytes=node.budget,
                free_after_load_bytes=node.budget - weights - kv - activation,
                holds_embedding=embedding,
                holds_head=head,
                bandwidth_gbs=node.bandwidth_gbs,
                bandwidth_assumed=node.bandwidth_assumed,
                gpu_cores=node.gpu_cores,
                gpu_cores_assumed=bool(node.cores_assumption),
                decode_seconds=timing.stage_seconds[i],
                share_of_time=timing.stage_seconds[i] / step,
            )
        )
    rdma = k > 1 and all(n.spec.rdma for n in order)
    return Plan(
        model=profile.name,
        precision=profile.precision,
        objective=objective,
        context_length=d.context,
        concurrency=d.concurrency,
        prompt_tokens=prompt,
        stages=tuple(stages),
        backend="jaccl" if rdma else "ring",
        decode_tokens_per_s=1.0 / step,
        aggregate_tokens_per_s=d.concurrency / step,
        ttft_s=timing.ttft_s,
        network_seconds=timing.network_seconds,
        formula=formula_text(d.concurrency, prompt),
        notes=tuple(notes),
    )


def formula_text(concurrency: int, prompt: int) -> str:
    return (
        f"t_token = sum over stages of (active weights + KV cache read) / (bandwidth x "
        f"{MEMORY_EFFICIENCY}, or a measured bandwidth x 1) + sum over hops of (latency + "
        f"{concurrency} x hidden x dtype bytes / link bandwidth); tok/s per stream = 1 / "
        f"t_token, aggregate = {concurrency} / t_token. TTFT = sum over stages of max((2 x "
        f"active params x {prompt} tokens + 2 x {prompt} x tokens seen x hidden) / (GPU cores "
        f"x {FLOPS_PER_GPU_CORE / 1e12:g} TFLOPS x {COMPUTE_EFFICIENCY}, or the measured "
        f"TFLOPS), weights / decode's bandwidth) + hops carrying {prompt} tokens of activations"
    )


@dataclass(frozen=True)
class Prediction:
    """The planner's figures for a placement already made (a serving plan)."""

    decode_tokens_per_s: float  # per stream
    aggregate_tokens_per_s: float
    ttft_s: float


def predict(
    profile: ModelProfile,
    stages: Sequence[tuple[NodeSpec, int, int]],
    *,
    context_length: int,
    prompt_tokens: int,
    concurrency: int = 1,
    head_on_every_stage: bool = False,
    links: Sequence[Link] = (),
) -> Prediction:
    """What `plan` predicts for `stages` — (node, start layer, end layer exclusive) in
    ring order — without choosing nodes or checking memory: the layers are already
    placed (a loaded model shows as memory in use, which would not fit again).

    context_length: tokens in each stream's KV cache (its reads cost decode time).
    links: measured links between the nodes; unmeasured hops count as DEFAULT_LINK.
    """
    if not stages:
        raise ValueError("predict needs at least one stage")
    if concurrency < 1 or not 1 <= prompt_tokens <= context_length:
        raise ValueError("concurrency must be at least 1, and prompt_tokens 1 to the context")
    ends = [end for _, _, end in stages]
    starts = [start for _, start, _ in stages]
    if (
        starts != [0, *ends[:-1]]
        or ends[-1] != profile.num_layers
        or any(end <= start for start, end in zip(starts, ends, strict=True))
    ):
        raise ValueError(
            f"stages must cover {profile.name}'s {profile.num_layers} layers in order, "
            "each holding at least one"
        )
    order = [resolve_node(node) for node, _, _ in stages]
    demand = Demand(profile, context_length, concurrency, head_on_every_stage)
    by_pair = {frozenset((link.a, link.b)): link for link in links}
    timing = _timing(order, ends, demand, by_pair, _Prefill.of(profile, prompt_tokens))
    step = timing.step_seconds
    return Prediction(1.0 / step, concurrency / step, timing.ttft_s)
