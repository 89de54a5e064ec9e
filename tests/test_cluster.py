"""A real cluster end to end: worker and coordinator processes, mDNS on
loopback, gRPC, and an MLX ring between runner processes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from clusterkit import (
    describe,
    generate_tokens,
    list_nodes,
    local_cluster,
    reference_tokens,
    wait_for,
    wait_serving,
)
from modelfactory import make_model

from pomona.v1 import common_pb2, coordinator_pb2

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


@pytest.mark.parametrize(
    ("arch", "num_layers", "workers", "layers"),
    [
        ("llama", 4, 2, "2,2"),
        ("llama", 8, 2, "3,5"),
        ("llama", 6, 3, "1,3,2"),
        ("qwen3", 5, 3, ""),
        ("gemma3", 8, 2, "5,3"),
        ("qwen3_moe", 4, 2, "1,3"),
        ("phi3", 4, 3, "2,1,1"),
        ("mistral", 4, 2, "1,3"),
        ("qwen2", 4, 2, ""),
        ("gemma2", 6, 2, "4,2"),
    ],
)
def test_greedy_tokens_match_single_process(
    tmp_path: Path, arch: str, num_layers: int, workers: int, layers: str
) -> None:
    model = make_model(tmp_path / arch, arch, num_layers=num_layers, shards=3, seed=7)
    expected = reference_tokens(model, PROMPT, 24)
    with local_cluster(tmp_path) as c:
        for i in range(workers):
            c.worker(f"w{i}")
        coord = c.coordinator(str(model), min_workers=workers, layers=layers)
        reply = wait_serving(coord)
        held = sorted((n.shard.start_layer, n.shard.end_layer) for n in reply.nodes)
        if layers:
            sizes = [int(x) for x in layers.split(",")]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            assert held == [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
        assert held[0][0] == 0 and held[-1][1] == num_layers
        tokens, _, last = generate_tokens(coord, PROMPT, max_tokens=24)
        assert tokens == expected
        assert last.usage.completion_tokens == len(tokens)
        # The cluster keeps serving: a second request gives the same tokens.
        assert generate_tokens(coord, PROMPT, max_tokens=24)[0] == expected


def test_late_workers_are_discovered_and_other_clusters_ignored(tmp_path: Path) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    with local_cluster(tmp_path) as c:
        coord = c.coordinator(str(model), min_workers=2)
        wait_for(lambda: coord.alive() and list_nodes(coord), 30, "the coordinator")
        stranger = c.worker("stranger", cluster="someone-else")
        first = c.worker("w0")
        second = c.worker("w1")
        reply = wait_serving(coord)
        names = sorted(n.name for n in reply.nodes)
        assert names == ["w0", "w1"]
        assert stranger.alive()
        assert describe(stranger).cluster == "someone-else"
        assert {describe(first).node_id, describe(second).node_id} == {
            n.node_id for n in reply.nodes
        }


def test_restarted_worker_keeps_its_node_id(tmp_path: Path) -> None:
    with local_cluster(tmp_path) as c:
        worker = c.worker("w0")
        first = wait_for(lambda: describe(worker), 30, "the worker").node_id
        worker.stop()
        again = c.worker("w0", port=worker.port)
        assert wait_for(lambda: describe(again), 30, "the worker").node_id == first
        other = c.worker("w1")
        assert wait_for(lambda: describe(other), 30, "the worker").node_id != first


@pytest.fixture(scope="module")
def serving_cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad-input")
    model = make_model(root / "llama", "llama", num_layers=4)
    with local_cluster(root) as c:
        c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(str(model), min_workers=2)
        wait_serving(coord)
        yield c, coord, model


def _request(**kwargs: object) -> common_pb2.GenerateRequest:
    sampling = kwargs.pop("sampling", common_pb2.SamplingParams())
    base: dict[str, object] = {"prompt": PROMPT, "max_tokens": 8}
    base.update(kwargs)
    return common_pb2.GenerateRequest(sampling=sampling, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_kwargs", "code", "words"),
    [
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"max_tokens": -3}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"sampling": common_pb2.SamplingParams(temperature=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"sampling": common_pb2.SamplingParams(top_p=1.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        ({"prompt": "lab " * 400}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"max_tokens": 100000}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "", "prompt_tokens": [5, 99999]}, grpc.StatusCode.INVALID_ARGUMENT, "vocab"),
    ],
)
def test_bad_requests_get_specific_errors_and_the_cluster_keeps_serving(
    serving_cluster, request_kwargs: dict[str, object], code: grpc.StatusCode, words: str
) -> None:
    from clusterkit import coordinator_stub

    c, coord, model = serving_cluster
    stub = coordinator_stub(coord)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(_request(**request_kwargs), timeout=30))
    assert info.value.code() == code
    assert words in info.value.details()
    tokens, _, last = generate_tokens(coord, PROMPT, max_tokens=8)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert tokens == reference_tokens(model, PROMPT, 8)


def test_unknown_model_is_reported_on_every_request(tmp_path: Path) -> None:
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        coord = c.coordinator("no-such-model")
        reply = wait_for(
            lambda: (r := list_nodes(coord)).problem.startswith("unknown model") and r,
            60,
            "the unknown-model problem",
        )
        assert not reply.serving
        with pytest.raises(grpc.RpcError) as info:
            generate_tokens(coord, PROMPT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unknown model 'no-such-model'" in info.value.details()


def test_model_larger_than_the_cluster_is_refused_with_the_shortfall(tmp_path: Path) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    with local_cluster(tmp_path) as c:
        c.worker("w0", extra=("--max-memory", "0.0002"))
        c.worker("w1", extra=("--max-memory", "0.0002"))
        coord = c.coordinator(str(model), min_workers=2)
        reply = wait_for(
            lambda: "does not fit" in (r := list_nodes(coord)).problem and r, 60, "a refusal"
        )
        # The refusal says by how much and what would make it fit.
        assert "short" in reply.problem and "would fit with" in reply.problem
        with pytest.raises(grpc.RpcError) as info:
            generate_tokens(coord, PROMPT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "MiB short" in info.value.details()
        assert all(n.state != coordinator_pb2.NODE_STATE_SERVING for n in reply.nodes)
