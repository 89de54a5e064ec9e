"""Invariants of placement over many layer counts, node counts and memory sizes."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pomona.chips import CHIPS
from pomona.coordinator.memory_fit import Demand, fit_stages, resolve_node
from pomona.coordinator.planner import NodeSpec, PlanError, plan, split_layers
from pomona.model_profile import LayerProfile, ModelProfile

MIB = 2**20
GIB = 2**30
CHIP_NAMES = [f"Apple {c.name}" for c in CHIPS] + ["Apple M9 Unknown"]


@st.composite
def profiles(draw: st.DrawFn, max_layers: int = 96) -> ModelProfile:
    n = draw(st.integers(1, max_layers))
    sizes = draw(st.lists(st.integers(1, 4096), min_size=1, max_size=3))  # MiB, cycled
    layers = tuple(
        LayerProfile(
            sizes[i % len(sizes)] * MIB,
            sizes[i % len(sizes)] * MIB // 2,
            0,
            0,
            draw(st.sampled_from([0, 512, 4096])),
            None,
        )
        for i in range(n)
    )
    return ModelProfile(
        name="synthetic",
        model_type="llama",
        layers=layers,
        embedding_bytes=draw(st.integers(0, 2048)) * MIB,
        head_bytes=draw(st.integers(0, 2048)) * MIB,
        tied_embeddings=draw(st.booleans()),
        other_params=0,
        dtype="bfloat16",
        quantization=None,
        hidden_size=4096,
        vocab_size=32000,
        max_context=None,
        activation_bytes_per_token=4096,
    )


@st.composite
def node_lists(draw: st.DrawFn, max_nodes: int = 8) -> list[NodeSpec]:
    count = draw(st.integers(1, max_nodes))
    return [
        NodeSpec(
            node_id=f"n{i}",
            name=f"node-{i}",
            chip=draw(st.sampled_from(CHIP_NAMES)),
            total_memory_bytes=draw(st.sampled_from([8, 16, 24, 32, 48, 64, 96, 128, 192])) * GIB,
            memory_in_use_bytes=draw(st.integers(0, 8)) * GIB,
            rdma=draw(st.booleans()),
        )
        for i in range(count)
    ]


settings_ = settings(max_examples=150, deadline=None)
plan_args: dict[str, Any] = {
    "context_length": st.sampled_from([256, 2048, 8192, 32768]),
    "concurrency": st.integers(1, 4),
    "objective": st.sampled_from(["latency", "throughput"]),
}


@settings_
@given(profile=profiles(), nodes=node_lists(), **plan_args)
def test_plans_are_contiguous_complete_non_empty_within_budget_and_deterministic(
    profile: ModelProfile,
    nodes: list[NodeSpec],
    context_length: int,
    concurrency: int,
    objective: str,
) -> None:
    kwargs: Any = dict(context_length=context_length, concurrency=concurrency, objective=objective)
    try:
        result = plan(profile, nodes, **kwargs)
    except PlanError as refusal:
        assert "does not fit" in str(refusal) and "\n" not in str(refusal)
        return
    stages = result.stages
    assert stages[0].start_layer == 0 and stages[-1].end_layer == profile.num_layers
    assert all(a.end_layer == b.start_layer for a, b in itertools.pairwise(stages))
    assert all(s.num_layers >= 1 for s in stages)
    assert all(s.free_after_load_bytes >= 0 for s in stages)
    assert len({s.node_id for s in stages}) == len(stages)
    by_id = {n.node_id: resolve_node(n) for n in nodes}
    assert all(s.budget_bytes == by_id[s.node_id].budget for s in stages)
    layer_bytes = sum(profile.layer_weight_bytes)
    fixed = profile.embedding_bytes + profile.head_bytes
    duplicated = profile.embedding_bytes if profile.tied_embeddings and len(stages) > 1 else 0
    assert sum(s.weights_bytes for s in stages) == layer_bytes + fixed + duplicated
    rdma = {n.node_id for n in nodes if n.rdma}
    all_rdma = len(stages) > 1 and all(s.node_id in rdma for s in stages)
    assert result.backend == ("jaccl" if all_rdma else "ring")
    assert plan(profile, list(reversed(nodes)), **kwargs) == result


def _brute_force_fits(order: list[Any], demand: Demand) -> bool:
    """Whether any composition of the layers into len(order) non-empty ranges fits."""
    n, k = demand.profile.num_layers, len(order)
    for cuts in itertools.combinations(range(1, n), k - 1):
        ends = [*cuts, n]
        starts = [0, *cuts]
        if all(
            demand.cost[e] - demand.cost[s] + demand.fixed(i, k) <= order[i].budget
            for i, (s, e) in enumerate(zip(starts, ends, strict=True))
        ):
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    profile=profiles(max_layers=10),
    nodes=node_lists(max_nodes=4),
    context=st.sampled_from([256, 8192]),
)
def test_fit_finds_a_split_exactly_when_one_exists(
    profile: ModelProfile, nodes: list[NodeSpec], context: int
) -> None:
    demand = Demand(profile, context, 1, head_everywhere=False)
    order = sorted((resolve_node(n) for n in nodes), key=lambda n: n.key)
    ends = fit_stages(order, demand)
    expected = len(order) <= profile.num_layers and _brute_force_fits(order, demand)
    assert (ends is not None) == expected
    if ends is not None:
        starts = [0, *ends[:-1]]
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            assert e > s
            need = demand.cost[e] - demand.cost[s] + demand.fixed(i, len(order))
            assert need <= order[i].budget


@settings_
@given(
    layers=st.integers(1, 300),
    weights=st.lists(st.floats(0.01, 1000, allow_nan=False), min_size=1, max_size=16),
)
def test_split_layers_sums_keeps_one_each_and_favours_larger_weights(
    layers: int, weights: list[float]
) -> None:
    if layers < len(weights):
        return
    counts = split_layers(layers, weights)
    assert sum(counts) == layers and min(counts) >= 1
    assert counts == split_layers(layers, weights)
    for i, j in itertools.combinations(range(len(weights)), 2):
        if weights[i] > weights[j]:
            assert counts[i] >= counts[j]
    total = sum(weights)
    assert all(c <= max(1, layers * w / total) + 1 for c, w in zip(counts, weights, strict=True))
