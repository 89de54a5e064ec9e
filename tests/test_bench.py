"""`pomona bench`: its arithmetic on made-up timings, and its JSON against a real cluster."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from clusterkit import coordinator_stub, local_cluster, wait_for, wait_serving
from modelfactory import VOCAB_SIZE, make_model

from pomona.bench_cmd import bench_command, check_context, parse_concurrency, serving_predictor
from pomona.bench_view import bench_json
from pomona.benchmark import (
    BenchSettings,
    Figure,
    Predicted,
    StreamTiming,
    aggregate_tokens_per_s,
    random_prompt,
    run_bench,
)
from pomona.model_profile import ModelProfile
from pomona.v1 import coordinator_pb2, worker_pb2


def timing(sent: float, first: float, last: float, tokens: int, asked: int = 0) -> StreamTiming:
    return StreamTiming(sent, first, last, tokens, asked or tokens, "length")


def test_decode_rate_leaves_the_prefill_out() -> None:
    t = timing(sent=0.0, first=2.0, last=3.0, tokens=11)
    assert t.ttft_s == 2.0
    assert t.decode_tokens_per_s == pytest.approx(10.0)  # 10 gaps in 1 s
    assert timing(0.0, 1.0, 1.0, 1).decode_tokens_per_s is None
    assert StreamTiming(0.0, None, None, 0, 8, "").ttft_s is None
    assert timing(0.0, 1.0, 2.0, 3, asked=8).ended_early


def test_aggregate_spans_first_token_of_any_to_last_of_any() -> None:
    streams = [timing(0.0, 1.0, 3.0, 5), timing(0.0, 2.0, 5.0, 9)]
    assert aggregate_tokens_per_s(streams) == pytest.approx((4 + 8) / (5.0 - 1.0))
    assert aggregate_tokens_per_s([]) is None


def test_figure_orders_its_values_and_compares_the_median_to_the_prediction() -> None:
    rng = random.Random(13)
    for _ in range(50):
        values = [rng.uniform(0.01, 100) for _ in range(rng.randint(1, 7))]
        predicted = rng.uniform(0.01, 100)
        f = Figure.of([*values, None], predicted)
        assert f.min is not None and f.median is not None and f.max is not None
        assert f.min <= f.median <= f.max
        assert f.ratio == pytest.approx(f.median / predicted)
        assert set(f.to_json()) == {"min", "median", "max", "predicted", "ratio", "values"}
    empty = Figure.of([None], None)
    assert empty.median is None and empty.ratio is None


def test_prompts_are_seeded_and_inside_the_vocabulary() -> None:
    a = random_prompt(random.Random(5), 500, 384)
    assert a == random_prompt(random.Random(5), 500, 384)
    assert all(0 <= t < 384 for t in a) and len(set(a)) > 100


@pytest.mark.parametrize("text", ["0", "1,0,4", "-2", "1,x", "4,,8", "2000"])
def test_a_bad_concurrency_is_one_clear_line(text: str) -> None:
    with pytest.raises(click.ClickException, match="--concurrency"):
        parse_concurrency(text)
    assert parse_concurrency("1,4,8,16") == (1, 4, 8, 16)
    assert parse_concurrency("none") == ()


def test_every_request_must_fit_the_context() -> None:
    check_context(BenchSettings(prompt_tokens=200, gen_tokens=56, concurrency=()), 256)
    with pytest.raises(click.ClickException, match="needs 257 tokens of context"):
        check_context(BenchSettings(prompt_tokens=200, gen_tokens=57, concurrency=()), 256)
    with pytest.raises(click.ClickException, match="second turn"):
        check_context(BenchSettings(prompt_tokens=100, gen_tokens=8, second_turn=True), 160)


DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"
CONFIGS = Path(__file__).parents[1] / "pomona" / "model_configs"


class FakeStreamer:
    """Every request takes 0.1 s to its first token, then 100 tok/s; prompts whose first
    id is even end after half their tokens."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def one(self, prompt: list[int], max_tokens: int) -> StreamTiming:
        self.prompts.append(prompt)
        made = max_tokens // 2 if prompt[0] % 2 == 0 and max_tokens > 2 else max_tokens
        return StreamTiming(0.0, 0.1, 0.1 + (made - 1) / 100, made, max_tokens, "length")

    def together(self, prompts: list[list[int]], max_tokens: int) -> list[StreamTiming]:
        return [self.one(p, max_tokens) for p in prompts]


def _documented_fields() -> set[str]:
    """Every name in backticks in the table of `docs/benchmarks.md`'s JSON section."""
    section = DOCS.read_text().split("schema `pomona.bench/v1`")[1]
    rows = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    return set(re.findall(r"`([a-z_]+)", rows))


def test_the_protocol_runs_every_part_and_its_json_is_as_documented() -> None:
    settings = BenchSettings(
        prompt_tokens=32, gen_tokens=9, repeats=5, concurrency=(1, 3), second_turn=True, seed=3
    )
    streamer, steps = FakeStreamer(), []

    def predictor(prompt: int, context: int, streams: int) -> Predicted:
        return Predicted(prompt / 1000, 50.0, 50.0 * streams)

    result = run_bench(streamer, settings, 384, predictor, steps.append)  # type: ignore[arg-type]
    assert len(steps) == settings.steps == 1 + 5 * (1 + 2 + 2)
    assert len(streamer.prompts) == 1 + 5 + 5 * (1 + 3) + 2 * 5
    firsts = [tuple(p[:8]) for p in streamer.prompts]
    assert len(set(firsts)) == len(firsts) - 5  # only second turns repeat a prefix
    early = sum(r.ended_early for r in result.runs)
    assert 0 < early < 5  # seed 3 gives both kinds
    assert len(result.decode.values) == 5 - early
    assert result.decode.median == pytest.approx(100.0)
    assert result.decode.ratio == pytest.approx(2.0)
    assert result.ttft.predicted == pytest.approx(0.032)
    assert [r.aggregate.predicted for r in result.sweep] == [50.0, 150.0]
    assert result.second_turn is not None
    assert result.second_turn.second.predicted == pytest.approx(0.096)
    assert any("no prefix-cache hit" in n for n in result.notes)  # the fake restores none

    doc = bench_json(result, {"coordinator": "c", "cluster": "k", "model": "m", "load_id": "l",
                              "stages": []}, ["a note"])  # fmt: skip
    documented = _documented_fields()
    assert set(doc) == {"schema", "coordinator", "cluster", "model", "load_id", "stages",
                        "settings", "single_stream", "sweep", "second_turn", "notes"}  # fmt: skip
    assert set(doc) <= documented
    assert set(doc["settings"]) <= documented
    assert set(doc["single_stream"]) <= documented
    assert set(doc["single_stream"]["runs"][0]) <= documented
    assert set(doc["sweep"][0]) <= documented
    assert set(doc["second_turn"]) <= documented
    assert doc["notes"][0] == "a note"
    json.dumps(doc)


def _bench(address: str, config: Path, *args: str) -> Any:
    return CliRunner().invoke(
        bench_command, ["--coordinator", address, "--config", str(config), *args]
    )


def _check_figure(f: dict[str, Any], repeats: int) -> None:
    assert len(f["values"]) == repeats
    assert 0 < f["min"] <= f["median"] <= f["max"]
    assert f["predicted"] > 0
    assert f["ratio"] == pytest.approx(f["median"] / f["predicted"])


@pytest.mark.cluster
def test_bench_json_against_a_local_cluster(tmp_path: Path) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        c.worker("w1")
        # The split pinned: the planner's follows each worker's measured memory
        # bandwidth, which a busy machine makes vary from run to run.
        coord = c.coordinator(str(model), min_workers=2, layers="2,2")
        wait_serving(coord)
        assert coord.config is not None

        # The Status reply says what prompts the serving model takes.
        def described() -> coordinator_pb2.StatusReply | None:
            reply = coordinator_stub(coord).Status(coordinator_pb2.StatusRequest(), timeout=10)
            return reply if reply.vocab_size else None

        status = wait_for(described, 30, "the model's vocabulary in Status")
        assert status.vocab_size == VOCAB_SIZE and status.max_context == 256
        assert ModelProfile.from_json(status.model_profile_json).num_layers == 4

        args = ["--prompt-tokens", "64", "--gen-tokens", "8", "--repeats", "2"]
        result = _bench(coord.address, coord.config, "--json", *args, "--concurrency", "1,2")
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        assert doc["schema"] == "pomona.bench/v1"
        assert [(s["start_layer"], s["end_layer"]) for s in doc["stages"]] == [(0, 2), (2, 4)]
        assert doc["settings"]["concurrency"] == [1, 2]
        single = doc["single_stream"]
        assert len(single["runs"]) == 2
        _check_figure(single["ttft_s"], 2)
        # Runs that ended on an end of sequence are left out of decode, unless all did.
        full = [r for r in single["runs"] if not r["ended_early"]] or single["runs"]
        rated = sum(r["decode_tokens_per_s"] is not None for r in full)
        _check_figure(single["decode_tokens_per_s"], rated)
        assert [row["concurrency"] for row in doc["sweep"]] == [1, 2]
        for row in doc["sweep"]:
            _check_figure(row["aggregate_tokens_per_s"], 2)
            assert len(row["ttft_s"]["values"]) == 2 * row["concurrency"]
        assert doc["second_turn"] is None
        # More streams are predicted to make more tokens per second in all.
        one, two = (row["aggregate_tokens_per_s"]["predicted"] for row in doc["sweep"])
        assert two > one

        turn = _bench(coord.address, coord.config, "--json", *args, "--concurrency", "none",
                      "--second-turn", "--repeats", "1")  # fmt: skip
        assert turn.exit_code == 0, turn.output
        second = json.loads(turn.output)["second_turn"]
        _check_figure(second["first_ttft_s"], 1)
        _check_figure(second["second_ttft_s"], 1)
        # The history (all but the 2 tokens a prompt always computes) came from the cache.
        assert second["prefix_cache"] is True and second["new_tokens"] == 64
        assert second["cached_tokens"] >= 64 - 2

        table = _bench(coord.address, coord.config, *args, "--concurrency", "2")
        assert table.exit_code == 0, table.output
        assert "TTFT, 64-token prompt" in table.output
        assert "aggregate tok/s, 2 streams" in table.output

        for bad, says in [
            (["--concurrency", "0"], "--concurrency 0: stream counts go from 1"),
            (["--prompt-tokens", "300"], "the cluster serves 256 at most"),
        ]:
            result = _bench(coord.address, coord.config, *bad)
            assert result.exit_code == 1
            assert result.output.count("\n") == 1 and says in result.output, result.output
        assert _bench(coord.address, coord.config, *args, "--concurrency", "none").exit_code == 0


def serving_status(**hardware: Any) -> coordinator_pb2.StatusReply:
    """Llama-3.1-8B served on two Linux workers, 16 layers each."""
    config = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    profile = ModelProfile.from_config(config, name="llama-3.1-8b")
    reply = coordinator_pb2.StatusReply(model_profile_json=profile.to_json())
    half = profile.num_layers // 2
    for i, name in enumerate(("w1", "w2")):
        status = reply.nodes.add()
        status.node.node_id = status.node.name = name
        status.node.hardware.CopyFrom(
            worker_pb2.Hardware(total_memory_bytes=16 << 30, chip="AMD EPYC", **hardware)
        )
        reply.plan.add(node_id=name, name=name, start_layer=half * i, end_layer=half * (i + 1))
    return reply


def test_bench_predictions_cross_the_links_the_coordinator_measured() -> None:
    status = serving_status(measured_bandwidth_gbs=2.0, measured_tflops=0.006)
    assumed, notes = serving_predictor(status)
    assert any("links not measured" in n for n in notes)
    status.links.add(from_node_id="w1", to_node_id="w2", rtt_ms=20.0, bandwidth_bytes_per_s=1e9)
    measured, notes = serving_predictor(status)
    assert not any("links not measured" in n for n in notes)
    slow, fast = measured(1, 64, 1), assumed(1, 64, 1)
    assert slow is not None and fast is not None
    # a hop each way (10 ms one way, against 0.3 ms assumed) in every decode step
    assert 1 / slow.decode_tokens_per_s - 1 / fast.decode_tokens_per_s == pytest.approx(
        2 * (0.010 - 0.0003), rel=0.01
    )


def test_bench_predicts_with_what_the_workers_measured_and_assumes_no_gpu_cores() -> None:
    guess, notes = serving_predictor(serving_status())
    assert any("7 GPU cores" in n for n in notes) and any("68 GB/s" in n for n in notes)
    status = serving_status(measured_bandwidth_gbs=2.0, measured_tflops=0.006)
    status.links.add(from_node_id="w1", to_node_id="w2", rtt_ms=0.1, bandwidth_bytes_per_s=1e9)
    measured, notes = serving_predictor(status)
    assert not any("GPU cores" in n or "assume" in n for n in notes)
    assert notes == [
        "predictions for w1, w2 use what the worker measured: 2 GB/s, 0.006 TFLOPS: "
        "see `pomona plan --coordinator`"
    ]
    before, after = guess(1024, 1056, 1), measured(1024, 1056, 1)
    assert before is not None and after is not None
    assert after.ttft_s > 100 * before.ttft_s  # 0.006 TFLOPS against 7 Apple GPU cores
