"""Placement on real model configs over realistic labs, and the planner's rules one by one."""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from pomona.chips import chip_bandwidth_gbs, lookup_chip, suggest_chip
from pomona.coordinator.planner import (
    MEMORY_EFFICIENCY,
    Link,
    NodeSpec,
    PlanError,
    plan,
    predict,
    split_layers,
)
from pomona.model_profile import LayerProfile, ModelProfile

GIB = 2**30
TABLE_CONTEXT = 4096  # the context the FITS and REFUSALS tables were worked out for
CONFIGS = Path(__file__).parents[1] / "pomona" / "model_configs"
needs_configs = pytest.mark.skipif(
    not CONFIGS.is_dir(), reason=f"real model configs not found at {CONFIGS}"
)


def machines(name: str, chip: str, memory_gb: int, count: int = 1) -> list[NodeSpec]:
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    return [NodeSpec(n, n, chip, memory_gb * GIB) for n in names]


LABS = {
    "2x M2 Ultra 192": machines("studio", "Apple M2 Ultra", 192, 2),
    "4x M4 Pro 64": machines("mini", "Apple M4 Pro", 64, 4),
    "M3 Max 128 + 2x M4 Pro 48": [
        *machines("mbp", "Apple M3 Max", 128),
        *machines("mini", "Apple M4 Pro", 48, 2),
    ],
    "8x M4 16": machines("m4", "Apple M4", 16, 8),
    "1x M2 Ultra 192": machines("studio", "Apple M2 Ultra", 192),
}


@cache
def profile(name: str, bits: int | None = None) -> ModelProfile:
    config: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    if bits is not None:
        config["quantization"] = {"group_size": 64, "bits": bits}
    return ModelProfile.from_config(config, name=name)


# (model, bits, lab) -> layers per node in ring order, or the phrases the refusal must say.
FITS: dict[tuple[str, int | None, str], list[tuple[str, int]]] = {
    ("llama-3.1-8b", None, "2x M2 Ultra 192"): [("studio-1", 32)],
    ("llama-3.1-8b", None, "4x M4 Pro 64"): [("mini-1", 32)],
    ("llama-3.1-8b", None, "M3 Max 128 + 2x M4 Pro 48"): [("mbp", 32)],
    ("llama-3.1-8b", None, "8x M4 16"): [("m4-1", 16), ("m4-2", 16)],
    ("llama-3.1-8b", None, "1x M2 Ultra 192"): [("studio", 32)],
    ("llama-3.1-8b", 4, "8x M4 16"): [("m4-1", 32)],
    ("llama-3.1-70b", None, "2x M2 Ultra 192"): [("studio-1", 80)],
    ("llama-3.1-70b", None, "4x M4 Pro 64"): [("mini-1", 27), ("mini-2", 27), ("mini-3", 26)],
    ("llama-3.1-70b", None, "M3 Max 128 + 2x M4 Pro 48"): [
        ("mbp", 38),
        ("mini-1", 22),
        ("mini-2", 20),
    ],
    ("llama-3.1-70b", None, "1x M2 Ultra 192"): [("studio", 80)],
    ("llama-3.1-70b", 4, "4x M4 Pro 64"): [("mini-1", 80)],
    ("llama-3.1-70b", 4, "M3 Max 128 + 2x M4 Pro 48"): [("mbp", 80)],
    ("llama-3.1-70b", 4, "8x M4 16"): [("m4-1", 20), ("m4-2", 20), ("m4-3", 20), ("m4-4", 20)],
    ("llama-3.1-405b", 4, "2x M2 Ultra 192"): [("studio-1", 63), ("studio-2", 63)],
    ("qwen2.5-72b", None, "2x M2 Ultra 192"): [("studio-1", 80)],
    ("qwen2.5-72b", None, "4x M4 Pro 64"): [("mini-1", 27), ("mini-2", 27), ("mini-3", 26)],
    ("qwen2.5-72b", None, "M3 Max 128 + 2x M4 Pro 48"): [
        ("mbp", 39),
        ("mini-1", 21),
        ("mini-2", 20),
    ],
    ("qwen2.5-72b", 4, "8x M4 16"): [("m4-1", 20), ("m4-2", 20), ("m4-3", 20), ("m4-4", 20)],
    ("qwen3-235b-a22b", 4, "2x M2 Ultra 192"): [("studio-1", 94)],
    ("qwen3-235b-a22b", 4, "4x M4 Pro 64"): [("mini-1", 32), ("mini-2", 31), ("mini-3", 31)],
    ("qwen3-235b-a22b", 4, "M3 Max 128 + 2x M4 Pro 48"): [("mbp", 67), ("mini-1", 27)],
    ("qwen3-235b-a22b", 4, "1x M2 Ultra 192"): [("studio", 94)],
    ("mixtral-8x7b", None, "2x M2 Ultra 192"): [("studio-1", 32)],
    ("mixtral-8x7b", None, "4x M4 Pro 64"): [("mini-1", 16), ("mini-2", 16)],
    ("mixtral-8x7b", None, "M3 Max 128 + 2x M4 Pro 48"): [("mbp", 32)],
    ("mixtral-8x7b", None, "8x M4 16"): [(f"m4-{i}", 4) for i in range(1, 9)],
    ("mixtral-8x7b", 4, "4x M4 Pro 64"): [("mini-1", 32)],
    ("mixtral-8x7b", 4, "8x M4 16"): [("m4-1", 11), ("m4-2", 11), ("m4-3", 10)],
}
REFUSALS: dict[tuple[str, int | None, str], list[str]] = {
    ("llama-3.1-70b", None, "8x M4 16"): ["on 8 nodes", "40.3 GiB short", "an 8-bit variant"],
    ("llama-3.1-405b", None, "2x M2 Ultra 192"): ["471.6 GiB short", "a 4-bit variant"],
    ("llama-3.1-405b", None, "1x M2 Ultra 192"): [
        "on 1 node",
        "614.8 GiB short",
        "A 4-bit variant (~212.6 GiB of weights) would not fit either",
    ],
    ("llama-3.1-405b", 4, "4x M4 Pro 64"): [
        "26.0 GiB short",
        "29.9 GiB more usable memory on mini-1 (at least 104 GB of RAM)",
    ],
    ("llama-3.1-405b", 4, "8x M4 16"): ["125.5 GiB short", "more nodes with 125.5 GiB"],
    ("qwen2.5-72b", None, "8x M4 16"): ["44.4 GiB short", "an 8-bit variant"],
    ("qwen3-235b-a22b", None, "2x M2 Ultra 192"): ["151.0 GiB short", "an 8-bit variant"],
    ("qwen3-235b-a22b", None, "4x M4 Pro 64"): ["247.4 GiB short", "a 4-bit variant"],
    ("qwen3-235b-a22b", 4, "8x M4 16"): ["29.5 GiB short", "38.4 GiB more usable memory on m4-1"],
    ("deepseek-v3", None, "2x M2 Ultra 192"): ["962.9 GiB short", "would not fit either"],
    ("deepseek-v3", 4, "2x M2 Ultra 192"): [
        "deepseek-v3 (4-bit (group 64))",
        "weights 351.7 GiB",
        "64.7 GiB short",
        "69.1 GiB more usable memory on studio-1",
    ],
    ("deepseek-v3", 4, "M3 Max 128 + 2x M4 Pro 48"): ["on 3 nodes", "185.1 GiB short"],
    ("deepseek-v3", 4, "8x M4 16"): ["259.1 GiB short"],
    ("deepseek-v3", 4, "1x M2 Ultra 192"): ["208.3 GiB short"],
}


@needs_configs
@pytest.mark.parametrize(("model", "bits", "lab"), sorted(FITS, key=str))
def test_real_models_get_the_expected_layers(model: str, bits: int | None, lab: str) -> None:
    result = plan(profile(model, bits), LABS[lab], context_length=TABLE_CONTEXT)
    assert [(s.name, s.num_layers) for s in result.stages] == FITS[model, bits, lab]
    assert all(s.free_after_load_bytes >= 0 for s in result.stages)
    assert result.stages[0].holds_embedding and result.stages[-1].holds_head
    assert result.backend == "ring"
    assert result.decode_tokens_per_s > 0 and result.ttft_s > 0


@needs_configs
@pytest.mark.parametrize(("model", "bits", "lab"), sorted(REFUSALS, key=str))
def test_real_models_that_do_not_fit_say_why(model: str, bits: int | None, lab: str) -> None:
    with pytest.raises(PlanError) as refusal:
        plan(profile(model, bits), LABS[lab], context_length=TABLE_CONTEXT)
    message = str(refusal.value)
    assert message.startswith(f"{model} (") and "does not fit" in message
    assert "\n" not in message
    for phrase in REFUSALS[model, bits, lab]:
        assert phrase in message
    assert refusal.value.shortfall_bytes > 0 and refusal.value.suggestions


@needs_configs
def test_shorter_context_is_suggested_when_the_kv_cache_is_what_does_not_fit() -> None:
    with pytest.raises(PlanError, match=r"a context of \d+ tokens or fewer") as refusal:
        plan(profile("llama-3.1-8b"), machines("mini", "Apple M4 Pro", 24), context_length=131072)
    assert "KV cache 16.0 GiB" in str(refusal.value)


@needs_configs
def test_fewer_streams_are_suggested_when_concurrency_does_not_fit() -> None:
    with pytest.raises(PlanError, match=r"\d+ concurrent streams or fewer"):
        plan(
            profile("llama-3.1-70b", 4),
            LABS["1x M2 Ultra 192"],
            context_length=32768,
            concurrency=32,
        )


@needs_configs
def test_throughput_objective_uses_every_node_balanced_by_bandwidth() -> None:
    result = plan(profile("llama-3.1-70b", 4), LABS["4x M4 Pro 64"], objective="throughput")
    assert [s.num_layers for s in result.stages] == [20, 20, 20, 20]
    assert len({round(s.share_of_time, 2) for s in result.stages}) <= 2
    assert not any("idle" in note for note in result.notes)


@needs_configs
def test_latency_objective_leaves_spare_nodes_idle_and_says_so() -> None:
    result = plan(profile("llama-3.1-8b"), LABS["4x M4 Pro 64"])
    assert len(result.stages) == 1
    assert any("3 of 4 nodes left idle" in note for note in result.notes)


@needs_configs
def test_single_node_decode_speed_is_bandwidth_over_bytes_read() -> None:
    p = profile("llama-3.1-8b")
    result = plan(p, LABS["1x M2 Ultra 192"], context_length=1024)
    read = p.weight_bytes - p.embedding_bytes + sum(p.layer_kv_bytes(j, 1024) for j in range(32))
    assert result.decode_tokens_per_s == pytest.approx(800e9 * MEMORY_EFFICIENCY / read)
    assert result.network_seconds == 0 and "t_token" in result.formula


def tiny_profile(layers: int = 8, layer_gib: float = 1.0, tied: bool = False) -> ModelProfile:
    layer = LayerProfile(int(layer_gib * GIB), int(layer_gib * GIB / 2), 0, 0, 1024, None)
    return ModelProfile(
        name="tiny",
        model_type="llama",
        layers=(layer,) * layers,
        embedding_bytes=GIB // 2,
        head_bytes=GIB // 2 + 8192,
        tied_embeddings=tied,
        other_params=GIB // 2,
        dtype="bfloat16",
        quantization=None,
        hidden_size=4096,
        vocab_size=32000,
        max_context=8192,
        activation_bytes_per_token=1024,
    )


def node(node_id: str, chip: str = "Apple M4 Pro", memory_gib: int = 24, **kw: Any) -> NodeSpec:
    return NodeSpec(node_id, node_id, chip, memory_gib * GIB, **kw)


def test_faster_memory_gets_proportionally_more_layers() -> None:
    nodes = [node("pro", "Apple M4 Pro", 64), node("max", "Apple M4 Max", 64, gpu_cores=40)]
    result = plan(tiny_profile(layers=30), nodes, objective="throughput")
    assert [(s.name, s.num_layers) for s in result.stages] == [("max", 20), ("pro", 10)]


def test_memory_caps_a_fast_node_and_the_rest_go_elsewhere() -> None:
    nodes = [node("max", "Apple M4 Max", 16, gpu_cores=40), node("pro", "Apple M4 Pro", 64)]
    result = plan(tiny_profile(layers=30), nodes, objective="throughput")
    assert result.stages[0].name == "max" and result.stages[0].num_layers < 15
    assert sum(s.num_layers for s in result.stages) == 30
    assert all(s.free_after_load_bytes >= 0 for s in result.stages)


def test_tied_embeddings_put_the_embedding_on_the_last_stage_too() -> None:
    nodes = [node("a"), node("b")]
    untied = plan(tiny_profile(layers=20), nodes)
    tied = plan(tiny_profile(layers=20, tied=True), nodes)
    assert tied.stages[-1].weights_bytes > untied.stages[-1].weights_bytes or (
        tied.stages[-1].num_layers < untied.stages[-1].num_layers
    )
    last = tied.stages[-1]
    assert last.weights_bytes == last.num_layers * GIB + GIB // 2 + GIB // 2 + 8192


def test_head_on_every_stage_loads_embedding_and_head_everywhere() -> None:
    result = plan(tiny_profile(layers=20), [node("a"), node("b")], head_on_every_stage=True)
    assert all(s.holds_embedding and s.holds_head for s in result.stages)


def test_jaccl_only_when_every_node_has_rdma() -> None:
    profile_ = tiny_profile(layers=20)  # needs both nodes
    both = [node("a", rdma=True), node("b", rdma=True)]
    assert plan(profile_, both).backend == "jaccl"
    assert plan(profile_, [node("a", rdma=True), node("b")]).backend == "ring"


def test_memory_in_use_and_a_raised_gpu_limit_change_the_budget() -> None:
    base = plan(tiny_profile(layers=4), [node("a", memory_gib=24)]).stages[0]
    assert base.budget_bytes == 18 * GIB  # 75% of 24
    busy = plan(tiny_profile(layers=4), [node("a", memory_gib=24, memory_in_use_bytes=10 * GIB)])
    assert busy.stages[0].budget_bytes == 10 * GIB  # 24 - 4 reserve - 10 in use
    raised = node("a", memory_gib=24, gpu_memory_limit_bytes=20 * GIB)
    assert plan(tiny_profile(layers=4), [raised], os_reserve_bytes=2 * GIB).stages[
        0
    ].budget_bytes == (20 * GIB)


def test_unknown_chip_bandwidth_is_assumed_and_said() -> None:
    result = plan(tiny_profile(layers=4), [node("x", "Apple M9 Hyper")])
    assert result.stages[0].bandwidth_assumed
    assert "assumed 68 GB/s" in result.notes[0]


def test_ring_order_follows_fast_links() -> None:
    nodes = [node(n, memory_gib=16) for n in "abcd"]
    fast, slow = 0.05, 5.0
    links = [
        Link(a, b, latency_ms=fast if {a, b} in ({"a", "c"}, {"b", "d"}) else slow, bandwidth_gbs=5)
        for a, b in itertools.combinations("abcd", 2)
    ]
    result = plan(
        tiny_profile(layers=32, layer_gib=1.0), nodes, links=links, objective="throughput"
    )
    order = [s.name for s in result.stages]
    assert order[0] == "a" and {order[1], order[3]} & {"c"} and order[2] != "c"
    assert result.network_seconds == pytest.approx(2 * fast / 1e3 + 2 * slow / 1e3, rel=0.01)


def test_context_beyond_the_model_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="maximum of 8192: ask for 8192 or fewer"):
        plan(tiny_profile(), [node("a")], context_length=10_000)


def test_no_nodes_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no nodes"):
        plan(tiny_profile(), [])


def test_duplicate_node_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        plan(tiny_profile(), [node("a"), node("a")])


def test_nodes_in_any_input_order_get_the_same_plan() -> None:
    nodes = [node("a", "Apple M4", 16), node("b", "Apple M4 Pro", 24), node("c", "Apple M2", 24)]
    first = plan(tiny_profile(layers=24), nodes, objective="throughput")
    assert plan(tiny_profile(layers=24), nodes[::-1], objective="throughput") == first


@pytest.mark.parametrize(
    ("layers", "weights", "expected"),
    [
        (20, [0.9, 0.05, 0.05], [18, 1, 1]),
        (80, [1, 1, 1], [27, 27, 26]),
        (30, [546, 273], [20, 10]),
        (3, [100, 1, 1], [1, 1, 1]),
        (10, [1, 1e-9, 1e-9], [8, 1, 1]),
        (7, [1], [7]),
    ],
)
def test_split_layers_is_proportional_with_at_least_one_each(
    layers: int, weights: list[float], expected: list[int]
) -> None:
    assert split_layers(layers, weights) == expected


@pytest.mark.parametrize(
    ("layers", "weights", "message"),
    [(2, [1, 1, 1], "cannot fill 3 stages"), (4, [], "at least one"), (4, [1, 0], "positive")],
)
def test_split_layers_refuses_impossible_splits(
    layers: int, weights: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        split_layers(layers, weights)


@pytest.mark.parametrize(
    ("name", "bandwidth"),
    [
        ("Apple M2 Ultra", 800.0),
        ("Apple M4 Pro", 273.0),
        ("apple  m1", 68.0),
        ("M3 Ultra", 819.0),
        ("Apple M5", 153.0),
        ("Apple M3 Max", 300.0),  # the slower variant when the core count is unknown
    ],
)
def test_chip_table_gives_apples_published_bandwidth(name: str, bandwidth: float) -> None:
    assert chip_bandwidth_gbs(name) == bandwidth


def test_chip_variants_are_told_apart_by_gpu_cores() -> None:
    assert chip_bandwidth_gbs("Apple M4 Max", gpu_cores=40) == 546.0
    assert chip_bandwidth_gbs("Apple M4 Max", gpu_cores=32) == 410.0
    assert lookup_chip("Apple M2 Ultra").gpu_core_counts == (60, 76)  # type: ignore[union-attr]


def test_unknown_chips_give_none_never_a_guess() -> None:
    assert lookup_chip("Apple M5 Ultra") is None
    assert chip_bandwidth_gbs("Intel Core i9") is None
    assert suggest_chip("Apple M4 Pr0") == "Apple M4 Pro"


def test_a_gpu_limit_below_free_ram_is_answered_with_the_sysctl_to_raise() -> None:
    with pytest.raises(PlanError, match=r"sudo sysctl iogpu.wired_limit_mb=\d+"):
        plan(tiny_profile(layers=52), [node("mini", memory_gib=64)])  # 48 GiB GPU of 60 free


# ---- predictions against published measurements of real Macs ------------------------

# Llama-3.x-70B 4-bit under mlx-lm, one Mac, a 4K prompt (the figures issue 17 cites):
# (chip, memory GB, GPU cores) -> (prefill tok/s, decode tok/s). The M3 Ultra is taken
# as the 80-core one: its prefill per core then matches the M3 Max's; the M3 Max with
# 64 GB is sold only with the 40-core GPU.
PUBLISHED = {
    ("Apple M3 Ultra", 256, 80): (170.0, 14.0),
    ("Apple M3 Max", 64, 40): (83.0, 9.3),
}
PUBLISHED_PROMPT = 4096
TOLERANCE = 0.25


@needs_configs
@pytest.mark.parametrize(("chip", "memory_gb", "cores"), sorted(PUBLISHED))
def test_predictions_are_within_a_quarter_of_published_measurements(
    chip: str, memory_gb: int, cores: int
) -> None:
    prefill, decode = PUBLISHED[chip, memory_gb, cores]
    node = NodeSpec("mac", "mac", chip, memory_gb * GIB, gpu_cores=cores)
    result = plan(profile("llama-3.1-70b", 4), [node], prompt_tokens=PUBLISHED_PROMPT)
    assert result.prompt_tokens == PUBLISHED_PROMPT
    assert PUBLISHED_PROMPT / result.ttft_s == pytest.approx(prefill, rel=TOLERANCE)
    assert result.decode_tokens_per_s == pytest.approx(decode, rel=TOLERANCE)
    assert not any("GPU cores" in note for note in result.notes)


@needs_configs
def test_a_chip_variant_assumed_for_want_of_a_core_count_is_said_in_the_plan() -> None:
    node = NodeSpec("mbp", "mbp", "Apple M3 Max", 64 * GIB)
    result = plan(profile("llama-3.1-70b", 4), [node])
    assert result.stages[0].gpu_cores == 30 and result.stages[0].gpu_cores_assumed
    (note,) = [n for n in result.notes if "GPU cores" in n]
    assert "assumed the 30-core M3 Max (300 GB/s)" in note and "30 or 40" in note
    assert any("GPU memory limit not given" in n for n in result.notes)
    given = plan(
        profile("llama-3.1-70b", 4),
        [
            NodeSpec(
                "mbp",
                "mbp",
                "Apple M3 Max",
                64 * GIB,
                gpu_memory_limit_bytes=48 * GIB,
                gpu_cores=40,
            )
        ],
    )
    assert not given.stages[0].gpu_cores_assumed
    assert not any("GPU" in n for n in given.notes)


@needs_configs
def test_ttft_is_predicted_for_the_prompt_length_asked() -> None:
    p, nodes = profile("llama-3.1-70b", 4), machines("studio", "Apple M3 Ultra", 256)
    default = plan(p, nodes)
    assert default.prompt_tokens == 512
    assert any("512-token prompt (the default)" in n for n in default.notes)
    short, long = (plan(p, nodes, prompt_tokens=n) for n in (512, 8192))
    assert short.prompt_tokens == 512 and long.prompt_tokens == 8192
    assert not any("(the default)" in n for n in long.notes)
    # Attention grows with the square of the prompt: 16x the tokens cost more than 16x.
    assert long.ttft_s > 16 * short.ttft_s
    with pytest.raises(ValueError, match="does not fit a context"):
        plan(p, nodes, context_length=4096, prompt_tokens=8192)


@needs_configs
@pytest.mark.parametrize("lab", ["4x M4 Pro 64", "M3 Max 128 + 2x M4 Pro 48"])
def test_predict_on_a_plans_own_stages_gives_the_plans_figures(lab: str) -> None:
    p, nodes = profile("llama-3.1-70b", 4), LABS[lab]
    by_id = {n.node_id: n for n in nodes}
    for concurrency, prompt in [(1, 4096), (8, 128)]:
        made = plan(p, nodes, context_length=8192, concurrency=concurrency, prompt_tokens=prompt)
        stages = [(by_id[s.node_id], s.start_layer, s.end_layer) for s in made.stages]
        got = predict(p, stages, context_length=8192, prompt_tokens=prompt, concurrency=concurrency)
        assert got.ttft_s == pytest.approx(made.ttft_s)
        assert got.decode_tokens_per_s == pytest.approx(made.decode_tokens_per_s)
        assert got.aggregate_tokens_per_s == pytest.approx(made.aggregate_tokens_per_s)
    # A shorter context reads less KV cache per step: decode is predicted faster.
    short = predict(p, stages, context_length=256, prompt_tokens=128)
    assert (
        short.decode_tokens_per_s
        > predict(p, stages, context_length=8192, prompt_tokens=128).decode_tokens_per_s
    )
    with pytest.raises(ValueError, match="cover"):
        predict(p, [(nodes[0], 1, p.num_layers)], context_length=256, prompt_tokens=128)


def test_plan_and_the_coordinator_default_to_the_same_context() -> None:
    import inspect

    from pomona.config import DEFAULT_CONTEXT, CoordinatorConfig

    assert DEFAULT_CONTEXT == CoordinatorConfig().context == 8192
    assert inspect.signature(plan).parameters["context_length"].default == DEFAULT_CONTEXT
