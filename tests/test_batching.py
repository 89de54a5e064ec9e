"""Many requests at once through one pipeline: continuous batching."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from clusterkit import (
    coordinator_stub,
    generate_tokens,
    local_cluster,
    reference_tokens,
    wait_serving,
)
from modelfactory import make_model

from pomona.v1 import common_pb2

pytestmark = pytest.mark.cluster

WORDS = ["four", "two", "many", "big", "small", "odd", "new", "old"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("batching")
    model = make_model(root / "qwen3", "qwen3", num_layers=4, seed=11)
    with local_cluster(root) as c:
        c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(
            str(model), min_workers=2, extra=("--max-queue", "16", "--prefill-step", "16")
        )
        wait_serving(coord)
        yield coord, model


def _prompt(i: int) -> str:
    return f"The lab has {WORDS[i % len(WORDS)]} machines and {i} cables"


def test_concurrent_greedy_clients_each_get_their_single_process_tokens(cluster) -> None:
    coord, model = cluster
    prompts = [_prompt(i) for i in range(16)]
    expected = {p: reference_tokens(model, p, 24) for p in prompts}
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            results[i] = generate_tokens(coord, prompts[i], max_tokens=24)[0]
        except BaseException as e:  # surfaced below
            errors.append(e)

    # Four quick waves of four: the queue holds 16, the batch runs up to 16.
    threads = []
    for wave in range(4):
        for i in range(wave * 4, wave * 4 + 4):
            threads.append(threading.Thread(target=client, args=(i,)))
            threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert not errors
    assert {i: results[i] for i in range(16)} == {i: expected[p] for i, p in enumerate(prompts)}


def test_a_client_gone_mid_stream_does_not_disturb_the_others(cluster) -> None:
    coord, model = cluster
    stub = coordinator_stub(coord)
    doomed = stub.Generate(
        common_pb2.GenerateRequest(prompt=_prompt(1), max_tokens=200), timeout=60
    )
    next(doomed)  # it is streaming
    others: dict[int, list[int]] = {}

    def client(i: int) -> None:
        others[i] = generate_tokens(coord, _prompt(i), max_tokens=24)[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in (2, 3)]
    for t in threads:
        t.start()
    doomed.cancel()
    for t in threads:
        t.join(120)
    assert others == {i: reference_tokens(model, _prompt(i), 24) for i in (2, 3)}
    # Its slot is free: a full batch of new requests still runs.
    assert generate_tokens(coord, _prompt(4), max_tokens=8)[0] == reference_tokens(
        model, _prompt(4), 8
    )


def test_a_full_queue_is_refused_with_resource_exhausted(cluster) -> None:
    coord, _ = cluster
    stub = coordinator_stub(coord)
    calls = [
        stub.Generate(common_pb2.GenerateRequest(prompt=_prompt(i), max_tokens=200), timeout=60)
        for i in range(40)
    ]
    codes = []
    for call in calls:
        try:
            for _ in call:
                pass
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "queue is full" in e.details()
    for call in calls:
        call.cancel()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes


def test_a_long_prompt_does_not_stall_streams_already_running(cluster) -> None:
    coord, model = cluster
    stub = coordinator_stub(coord)
    short = stub.Generate(common_pb2.GenerateRequest(prompt=_prompt(5), max_tokens=60), timeout=60)
    arrivals: list[float] = []
    short_tokens: list[int] = []

    def read_short() -> None:
        for chunk in short:
            short_tokens.extend(chunk.tokens)
            arrivals.append(time.monotonic())

    reader = threading.Thread(target=read_short)
    reader.start()
    while not arrivals:
        time.sleep(0.01)
    long_prompt = " ".join(f"machine {i} holds layers" for i in range(30))  # ~150 tokens
    sent = time.monotonic()
    long_tokens, _, _ = generate_tokens(coord, long_prompt, max_tokens=4)
    reader.join(60)
    # The long prompt was prefilled in 16-token chunks between decode steps:
    # the short stream kept receiving tokens while it was being prefilled.
    during = [t for t in arrivals if t > sent]
    assert len(during) >= 3
    assert short_tokens == reference_tokens(model, _prompt(5), 60)
    assert long_tokens == reference_tokens(model, long_prompt, 4)


def test_a_model_that_cannot_batch_serves_concurrent_clients_one_per_lane(
    tmp_path: Path,
) -> None:
    # mlx-lm's gemma2 attention cannot take a batched mask: the head finds
    # that before serving and runs one request per lane (two at once here)
    # instead of failing the pipeline at the first concurrent request.
    model = make_model(tmp_path / "gemma2", "gemma2", num_layers=2, seed=5)
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(str(model), min_workers=2)
        wait_serving(coord)
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                results[i] = generate_tokens(coord, _prompt(i), max_tokens=10)[0]
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert results == {i: reference_tokens(model, _prompt(i), 10) for i in range(5)}
