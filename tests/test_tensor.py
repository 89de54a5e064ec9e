"""Tensor parallelism: every worker holds a slice of every layer (mlx-lm's shard()).

One real cluster per model (two workers, the ring over loopback) proves greedy
tokens equal single-process mlx-lm's, alone and for concurrent requests, and
that a killed runner re-forms the group. The choice between pipeline and tensor
is pure and tested without processes.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from clusterkit import (
    generate_tokens,
    local_cluster,
    reference_tokens_of,
    wait_for,
    wait_serving,
    worker_stub,
)
from modelfactory import make_model

from pomona.cli import main
from pomona.coordinator.parallel import (
    RDMA_LINK,
    TCP_LINK,
    choose_parallel,
    collective_seconds,
    is_tensor_layout,
    pipeline_at_link,
    plan_tensor,
    predict_tensor,
    tensor_refusal,
)
from pomona.coordinator.planner import NodeSpec, PlanError
from pomona.model_profile import ModelProfile
from pomona.v1 import worker_pb2

PROMPTS = [
    "The lab has four machines and",
    "Tokens flow from one machine",
    "A cluster of small computers",
    "The quick brown fox",
    # Longer than the tokens a control collective carries inline: its prefill chunk
    # goes in a second all_sum.
    "Each machine holds some layers of the model. " * 8,
]
GIB = 2**30


@pytest.mark.cluster
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tensor_parallel_greedy_tokens_match_single_process(tmp_path: Path, arch: str) -> None:
    model = make_model(tmp_path / arch, arch, num_layers=4, shards=3, seed=7)
    expected = reference_tokens_of(model, PROMPTS, 20)
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(str(model), min_workers=2, extra=("--parallel", "tensor"))
        reply = wait_serving(coord)
        # Every rank holds (a slice of) every layer.
        assert sorted(
            (n.shard.rank, n.shard.start_layer, n.shard.end_layer) for n in reply.nodes
        ) == [
            (0, 0, 4),
            (1, 0, 4),
        ]
        # Each rank materialized its slices, not the whole model.
        whole = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        assert all(n.shard.weights_bytes < 0.75 * whole for n in reply.nodes)
        assert generate_tokens(coord, PROMPTS[0], max_tokens=20)[0] == expected[PROMPTS[0]]

        # Concurrent requests share steps (batched prefill and decode) and each
        # still gets its single-process tokens.
        results: dict[str, list[int]] = {}

        def client(prompt: str) -> None:
            results[prompt] = generate_tokens(coord, prompt, max_tokens=20)[0]

        threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == expected

        if arch != "llama":
            # A Load that asks a tensor rank for part of the layers is refused, with why.
            bad = worker_pb2.LoadRequest(
                load_id="x", model=str(model), start_layer=1, end_layer=4, rank=0,
                world_size=2, ring_hosts=["127.0.0.1:1"] * 2, workers=["127.0.0.1:1"] * 2,
                parallel="tensor",
            )  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                worker_stub(c.procs[0]).Load(bad, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "every layer" in str(refused.value.details())
            return
        # A restarted coordinator adopts the running tensor group instead of reloading it.
        load_id = reply.nodes[0].shard.load_id
        coord.stop(signal.SIGKILL)
        coord = c.coordinator(str(model), min_workers=2, extra=("--parallel", "tensor"))
        reply = wait_serving(coord)
        assert {n.shard.load_id for n in reply.nodes} == {load_id}
        assert generate_tokens(coord, PROMPTS[2], max_tokens=20)[0] == expected[PROMPTS[2]]

        # A runner that dies breaks every rank's collective: the group re-forms and serves.
        follower = next(n for n in reply.nodes if n.shard.rank == 1)
        load_id = follower.shard.load_id
        os.kill(follower.shard.runner_pid, signal.SIGKILL)
        wait_for(
            lambda: (
                (r := wait_serving(coord))
                and all(n.shard.load_id != load_id for n in r.nodes if n.shard.load_id)
                and r
            ),
            120,
            "the group to re-form",
        )
        assert generate_tokens(coord, PROMPTS[1], max_tokens=20)[0] == expected[PROMPTS[1]]


def test_a_step_and_its_tokens_cross_in_one_broadcast_vector() -> None:
    from pomona.worker.lockstep import CTRL_LEN, Sampling, Step, decode_ctrl
    from pomona.worker.tensor import INLINE_TOKENS, encode_broadcast, with_token_ids

    decode = Step(lane=0, prefill=False, tokens=(5, 6, 7), join=(Sampling(),), remove=(1,))
    vector, rest = encode_broadcast(decode)
    assert len(vector) == CTRL_LEN + INLINE_TOKENS and rest == []
    got = decode_ctrl(vector[:CTRL_LEN])
    assert got is not None
    assert with_token_ids(got, vector[CTRL_LEN : CTRL_LEN + 3]) == decode

    rows = (tuple(range(1, 51)), tuple(range(100, 140)))  # 90 tokens: 64 inline, 26 after
    prefill = Step(lane=0, prefill=True, chunk=rows, new_group=True)
    vector, rest = encode_broadcast(prefill)
    assert len(rest) == 90 - INLINE_TOKENS
    got = decode_ctrl(vector[:CTRL_LEN])
    assert got is not None
    assert with_token_ids(got, vector[CTRL_LEN:] + rest) == prefill
    assert decode_ctrl(encode_broadcast(None)[0][:CTRL_LEN]) is None


def _nodes(
    count: int, *, rdma: bool, memory_gib: int = 64, chip: str = "Apple M4 Pro", cores: int = 20
) -> list[NodeSpec]:
    return [
        NodeSpec(f"n{i}", f"mac-{i}", chip, memory_gib * GIB, gpu_cores=cores, rdma=rdma)
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def llama70b() -> ModelProfile:
    from pomona.coordinator.plan_cli import load_profile

    return load_profile("llama-3.1-70b", bits=4)


def test_tensor_pays_at_rdma_latency_and_not_over_tcp(llama70b: ModelProfile) -> None:
    nodes = _nodes(2, rdma=True)
    tensor = plan_tensor(llama70b, nodes)
    pipeline = pipeline_at_link(llama70b, nodes, tensor.link)
    assert tensor.link == RDMA_LINK and tensor.world_size == 2
    assert choose_parallel("auto", pipeline, tensor).mode == "tensor"
    # Each Mac reads half the weights per token, and 161 collectives cost ~10 ms.
    assert tensor.decode_tokens_per_s > 1.5 * pipeline.decode_tokens_per_s
    # `pomona bench` predicts a serving tensor group as the plan did.
    assert is_tensor_layout(80, [(0, 80), (0, 80)]) and not is_tensor_layout(80, [(0, 80)])
    served = predict_tensor(llama70b, nodes, context_length=8192, prompt_tokens=512)
    assert served.decode_tokens_per_s == pytest.approx(tensor.decode_tokens_per_s)
    assert served.ttft_s == pytest.approx(tensor.ttft_s)

    # Over TCP the collectives cost more than halving the reads saves.
    nodes = _nodes(2, rdma=False, memory_gib=192, chip="Apple M2 Ultra", cores=76)
    tensor = plan_tensor(llama70b, nodes)
    pipeline = pipeline_at_link(llama70b, nodes, tensor.link)
    assert tensor.link == TCP_LINK
    # 80 layers x 2 all_sums x 2 messages of 0.3 ms: ~96 ms a token in collectives alone.
    assert tensor.collective_seconds > 0.09
    choice = choose_parallel("auto", pipeline, tensor)
    assert choice.mode == "pipeline" and "tok/s" in choice.reason
    # Asked for, it is used anyway.
    assert choose_parallel("tensor", pipeline, tensor).mode == "tensor"
    assert choose_parallel("pipeline", pipeline, tensor).mode == "pipeline"


def test_tensor_memory_is_a_slice_of_the_layers_plus_the_whole_vocabulary(
    llama70b: ModelProfile,
) -> None:
    p = llama70b
    tensor = plan_tensor(p, _nodes(2, rdma=True), context_length=4096, concurrency=1)
    layers = sum(p.layer_weight_bytes)
    for rank in tensor.ranks:
        # mlx-lm shards neither the embedding nor the head: each rank holds both whole.
        assert rank.weights_bytes == layers // 2 + p.embedding_bytes + p.head_bytes
        assert rank.kv_bytes == sum(p.layer_kv_bytes(j, 4096) for j in range(p.num_layers)) // 2
    # 4-bit 70B (~37 GiB) does not fit one 48 GiB Mac's GPU budget twice, but halves do.
    with pytest.raises(PlanError, match="needs"):
        plan_tensor(p, _nodes(2, rdma=True, memory_gib=24))
    assert plan_tensor(p, _nodes(2, rdma=True, memory_gib=48)).world_size == 2


def test_collectives_cost_two_messages_per_peer_round_the_ring() -> None:
    assert collective_seconds(1, TCP_LINK, 1e6) == 0
    assert collective_seconds(2, RDMA_LINK, 0) == pytest.approx(2 * 30e-6)
    assert collective_seconds(4, TCP_LINK, 0) == pytest.approx(6 * 0.3e-3)


def test_architectures_without_shard_are_refused_and_auto_falls_back(tmp_path: Path) -> None:
    from pomona.worker.shard import StageSpec, load_tensor_slice

    gemma_path = make_model(tmp_path / "g", "gemma2", num_layers=2)
    llama_path = make_model(tmp_path / "l", "llama", num_layers=2)
    gemma = ModelProfile.from_model_dir(gemma_path)
    llama = ModelProfile.from_model_dir(llama_path)
    # The runner refuses too, before it reads a weight or needs a group.
    with pytest.raises(ValueError, match="has no shard"):
        load_tensor_slice(gemma_path, StageSpec(0, 2, 0, 2, tensor=True), None)
    with pytest.raises(ValueError, match="does not divide among 3 ranks"):
        load_tensor_slice(llama_path, StageSpec(0, 2, 0, 3, tensor=True), None)
    assert "has no shard()" in tensor_refusal(gemma, 2)
    assert tensor_refusal(llama, 2) == ""
    # 4 heads, 2 KV heads: three ranks cannot share them.
    assert "do not all divide among 3 ranks" in tensor_refusal(llama, 3)
    nodes = _nodes(2, rdma=True)
    with pytest.raises(PlanError, match="has no shard"):
        plan_tensor(gemma, nodes)
    why = "mlx-lm's gemma2 model has no shard()"
    pipeline = pipeline_at_link(gemma, nodes, RDMA_LINK, context_length=256)
    choice = choose_parallel("auto", pipeline, None, why)
    assert choice.mode == "pipeline" and "no shard()" in choice.reason
    with pytest.raises(PlanError, match="--parallel tensor: mlx-lm's gemma2"):
        choose_parallel("tensor", None, None, why)


def test_plan_shows_both_predictions_and_the_choice(tmp_path: Path) -> None:
    gemma = make_model(tmp_path / "g", "gemma2", num_layers=2)
    nodes = tmp_path / "nodes.json"
    nodes.write_text(
        '[{"name": "a", "chip": "Apple M4 Pro", "memory_gb": 64, "rdma": true},'
        ' {"name": "b", "chip": "Apple M4 Pro", "memory_gb": 64, "rdma": true}]'
    )
    run = CliRunner().invoke
    out = run(main, ["plan", "llama-3.1-70b", "--bits", "4", "--nodes", str(nodes)])
    assert out.exit_code == 0, out.output
    assert "parallel: tensor" in out.output
    assert "pipeline:" in out.output and "tensor:" in out.output and "RDMA" in out.output
    out = run(
        main,
        ["plan", "llama-3.1-70b", "--bits", "4", "--nodes", str(nodes), "--parallel", "pipeline"],
    )
    assert out.exit_code == 0 and "parallel: pipeline" in out.output
    out = run(main, ["plan", str(gemma), "--nodes", str(nodes), "--parallel", "tensor"])
    assert out.exit_code != 0 and "has no shard()" in out.output
    out = run(main, ["coordinator", "--model", "x", "--parallel", "tensor", "--layers", "1,1"])
    assert out.exit_code != 0 and "--layers" in out.output


def test_measured_links_price_both_choices(llama70b: ModelProfile) -> None:
    from pomona.coordinator.parallel import compare_parallel
    from pomona.coordinator.planner import Link

    nodes = _nodes(2, rdma=False)
    # A measured Thunderbolt link at RDMA latency: tensor pays even without the rdma flag.
    fast = [Link("n0", "n1", latency_ms=0.03, bandwidth_gbs=6.0, kind="thunderbolt")]
    found = compare_parallel(llama70b, nodes, "auto", links=fast)
    assert found.link.kind == "thunderbolt" and found.choice.mode == "tensor"
    slow = [Link("n0", "n1", latency_ms=0.6, bandwidth_gbs=1.0, kind="ethernet")]
    found = compare_parallel(llama70b, nodes, "auto", links=slow)
    assert found.link.kind == "ethernet" and found.choice.mode == "pipeline"
