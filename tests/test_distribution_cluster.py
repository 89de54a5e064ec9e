"""A model on one worker is enough: real worker and coordinator processes, real gRPC.

Only one worker's model directory (or only the coordinator's) holds the model;
the others fetch exactly their stage's tensors from it before their runners start.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from clusterkit import (
    Proc,
    describe,
    generate_tokens,
    list_nodes,
    local_cluster,
    reference_tokens,
    wait_for,
    wait_serving,
)
from modelfactory import make_model

from pomona import rpc
from pomona.local import free_port_pair
from pomona.safetensors_layout import read_layout, weight_map
from pomona.stage_cache import StageKey, tensors_for_stage
from pomona.v1 import transfer_pb2, transfer_pb2_grpc
from pomona.worker.transfer_fetch import CHUNK_BYTES

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


def _share(model: Path, key: StageKey) -> tuple[list[str], int]:
    layout = {}
    for file in set(weight_map(model).values()):
        layout.update(read_layout(model / file))
    names = tensors_for_stage(list(layout), key)
    return sorted(names), sum(layout[n].info.nbytes for n in names)


def _stage_folders(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "stages").glob("*/*") if p.is_dir())


def _check_only_its_share(model: Path, cache: Path, shard: object, world: int) -> None:
    folders = _stage_folders(cache)
    assert len(folders) == 1, folders
    folder = folders[0]
    key = StageKey.of(shard.start_layer, shard.end_layer, shard.rank, world)  # type: ignore[attr-defined]
    names, nbytes = _share(model, key)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == names
    held = read_layout(folder / "model.safetensors")
    assert sum(t.info.nbytes for t in held.values()) == nbytes
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]


def pomona(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pomona", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _check_visible(tmp_path: Path, coord: Proc, http_port: int) -> None:
    """Models, status, events and /metrics tell who holds what and what was fetched."""
    listed = pomona("models", "--json", "--coordinator", coord.address, config=coord.config)
    assert listed.returncode == 0, listed.stderr
    tiny = next(m for m in json.loads(listed.stdout)["models"] if m["model"] == "tiny")
    holders = {h["name"]: h for h in tiny["holders"]}
    assert holders["w0"]["complete"] and not holders["w1"]["complete"]
    assert [(s["start_layer"], s["end_layer"]) for s in holders["w1"]["stages"]] != []
    status = pomona("status", "--json", "--coordinator", coord.address, config=coord.config)
    transfers = json.loads(status.stdout)["transfers"]
    assert [(t["name"], t["progress"]["state"]) for t in transfers] == [("w1", "done")]
    events = pomona("events", "--coordinator", coord.address, config=coord.config).stdout
    assert "transfer_started" in events and "transfer_finished" in events
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'pomona_transfer_bytes_received{node="w1"' in metrics
    # A second model, pulled ahead of serving.
    make_model(tmp_path / "holder" / "other", "llama", num_layers=4, shards=1, seed=3)
    pulled = pomona("pull", "other", "--coordinator", coord.address, config=coord.config)
    assert pulled.returncode == 0, pulled.stderr
    assert "every worker holds its stage" in pulled.stdout
    assert len(list((tmp_path / "cache-w1" / "stages").glob("other-*/*"))) == 1


def _run(
    tmp_path: Path, workers: int, layers: str, num_layers: int, coordinator_holds: bool = False
) -> None:
    """Serves with the model on w0 only, or on the coordinator only."""
    model = make_model(
        tmp_path / "holder" / "tiny", "llama", num_layers=num_layers, shards=3, seed=7
    )
    expected = reference_tokens(model, PROMPT, 24)
    empty = tmp_path / "empty"
    empty.mkdir()
    holds = ("--model-dir", str(tmp_path / "holder"))
    with local_cluster(tmp_path) as c:
        for i in range(workers):
            extra: tuple[str, ...] = ("--cache-dir", str(tmp_path / f"cache-w{i}"))
            if i == 0 and not coordinator_holds:
                extra += holds
            c.worker(f"w{i}", extra=extra, model_dir=empty)
        http_port = free_port_pair(c.taken)
        coord = c.coordinator(
            "tiny",
            min_workers=workers,
            layers=layers,
            http_port=http_port,
            extra=holds if coordinator_holds else (),
        )
        reply = wait_serving(coord)
        tokens, _, _ = generate_tokens(coord, PROMPT, max_tokens=24)
        assert tokens == expected
        by_name = {n.name: n for n in reply.nodes}
        receivers = range(workers) if coordinator_holds else range(1, workers)
        if not coordinator_holds:
            assert not _stage_folders(tmp_path / "cache-w0")
        for i in receivers:
            _check_only_its_share(model, tmp_path / f"cache-w{i}", by_name[f"w{i}"].shard, workers)
        if coordinator_holds:
            _check_coordinator_listed(coord)
        elif workers == 2:
            _check_visible(tmp_path, coord, http_port)


def _check_coordinator_listed(coord: Proc) -> None:
    """`pomona models` names the coordinator as the model's one whole holder."""
    listed = pomona("models", "--json", "--coordinator", coord.address, config=coord.config)
    assert listed.returncode == 0, listed.stderr
    tiny = next(m for m in json.loads(listed.stdout)["models"] if m["model"] == "tiny")
    assert [(h["name"], h["complete"]) for h in tiny["holders"] if h["complete"]] == [
        ("coordinator", True)
    ]
    events = pomona("events", "--coordinator", coord.address, config=coord.config).stdout
    assert events.count("transfer_finished") == 2
    # Its ModelTransfer service makes the checks a worker's makes, signed for "".
    stub = transfer_pb2_grpc.ModelTransferStub(rpc.channel(coord.address, coord.auth))
    catalog = stub.Catalog(transfer_pb2.CatalogRequest(model="tiny"), timeout=10)
    assert catalog.complete and "config.json" in [f.name for f in catalog.files]
    refusals = [
        (stub.ReadFile, transfer_pb2.ReadFileRequest(model="tiny", name="../tiny/config.json")),
        (stub.Catalog, transfer_pb2.CatalogRequest(model="../holder/tiny")),
        (stub.Catalog, transfer_pb2.CatalogRequest(model="/etc")),
    ]
    for call, request in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=10)
        assert refused.value.code() in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.NOT_FOUND,
        ), refused.value
    with pytest.raises(grpc.RpcError) as no_stage:
        list(stub.Stage(transfer_pb2.StageRequest(model="tiny"), timeout=10))
    assert no_stage.value.code() == grpc.StatusCode.UNIMPLEMENTED
    unsigned = transfer_pb2_grpc.ModelTransferStub(rpc.channel(coord.address))
    with pytest.raises(grpc.RpcError) as unauthenticated:
        unsigned.Catalog(transfer_pb2.CatalogRequest(model="tiny"), timeout=10)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_model_on_one_of_two_workers_serves_with_greedy_tokens_of_mlx_lm(tmp_path: Path) -> None:
    _run(tmp_path, 2, "2,2", 4)


def test_three_workers_each_receive_only_their_share(tmp_path: Path) -> None:
    _run(tmp_path, 3, "2,2,2", 6)


def test_a_model_only_the_coordinator_holds_serves_on_two_workers(tmp_path: Path) -> None:
    _run(tmp_path, 2, "2,2", 4, coordinator_holds=True)


def test_a_tied_embedding_two_stages_need_leaves_the_source_once(tmp_path: Path) -> None:
    """Fan-out: w0 holds the model and takes the middle stage; the first and the last
    stage both need the tied embedding, and the last takes it from the first."""
    model = make_model(tmp_path / "holder" / "tied", "qwen2", num_layers=4, shards=2, seed=11)
    expected = reference_tokens(model, PROMPT, 12)
    empty = tmp_path / "empty"
    empty.mkdir()
    with local_cluster(tmp_path) as c:
        for i in range(3):
            extra: tuple[str, ...] = ("--cache-dir", str(tmp_path / f"cache-w{i}"))
            if i == 0:
                extra += ("--model-dir", str(tmp_path / "holder"))
            c.worker(f"w{i}", extra=extra, model_dir=empty)
        coord = c.coordinator("tied", min_workers=3, layers="1,2,1")
        reply = wait_serving(coord)
        tokens, _, _ = generate_tokens(coord, PROMPT, max_tokens=12)
        assert tokens == expected
        shards = {n.name: n.shard for n in reply.nodes}
        assert shards["w0"].rank == 1
        source = next(p for p in c.procs if p.name == "worker-w0")
        stub = transfer_pb2_grpc.ModelTransferStub(
            rpc.channel(source.address, source.auth, describe(source).node_id)
        )
        sent = stub.ListModels(transfer_pb2.ListModelsRequest(), timeout=10).bytes_sent
        events = pomona("events", "--coordinator", coord.address, config=coord.config).stdout
    shares = {}
    for name, shard in shards.items():
        key = StageKey.of(shard.start_layer, shard.end_layer, shard.rank, 3)
        shares[name] = _share(model, key)[1]
    embed, embed_bytes = _share(model, StageKey.of(0, 0, 0, 3))
    assert embed == ["model.embed_tokens.weight"]
    # Each receiver's share once, the embedding they share once.
    assert (
        sent
        == shares[next(n for n, s in shards.items() if s.rank == 0)]
        + shares[next(n for n, s in shards.items() if s.rank == 2)]
        - embed_bytes
    )
    assert "of it from peers" in events


def _logged_bytes(partial: Path, model: Path) -> int:
    """Bytes of the chunks a cut transfer had verified and recorded."""
    sizes = {}
    for file in set(weight_map(model).values()):
        sizes.update({n: t.info.nbytes for n, t in read_layout(model / file).items()})
    done = set()
    for line in (partial / "chunks.log").read_text().splitlines():
        key = line.rsplit(" ", 1)[0]
        if line.startswith("-"):
            done.discard(line[1:])
        else:
            done.add(key)
    total = 0
    for key in done:
        tensor, offset = key.rsplit("@", 1)
        total += min(CHUNK_BYTES, sizes[tensor] - int(offset))
    return total


def test_a_killed_source_restarted_resumes_without_resending_chunks(tmp_path: Path) -> None:
    # About 130 MB, so that the transfer is still running when the source dies.
    model = make_model(
        tmp_path / "holder" / "big",
        "llama",
        num_layers=8,
        shards=2,
        overrides={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8},
    )
    key = StageKey.of(0, 8, 0, 1)
    names, share = _share(model, key)
    with local_cluster(tmp_path) as c:
        holder_args = ("--model-dir", str(tmp_path / "holder"), "--cache-dir", str(tmp_path / "ch"))
        source = c.worker("source", extra=holder_args)
        receiver = c.worker("receiver", extra=("--cache-dir", str(tmp_path / "cache-r")))
        wait_for(lambda: describe(source) and describe(receiver), 60, "the workers")
        stub = transfer_pb2_grpc.ModelTransferStub(
            rpc.channel(receiver.address, receiver.auth, describe(receiver).node_id)
        )
        request = transfer_pb2.StageRequest(
            model="big",
            start_layer=0,
            end_layer=8,
            rank=0,
            world_size=1,
            sources=[source.address],
            source_node_ids=[describe(source).node_id],
        )
        partial = tmp_path / "cache-r" / "stages"

        def logged() -> bool:
            logs = list(partial.glob("*/*.partial/chunks.log"))
            return bool(logs) and logs[0].stat().st_size > 0

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(lambda: list(stub.Stage(request, timeout=120)))
            wait_for(logged, 60, "the first chunks", interval=0.002)
            source.stop(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as cut:
                running.result()
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        folder = next(partial.glob("*/*.partial"))
        done = _logged_bytes(folder, model)
        assert 0 < done < share
        restarted = c.worker("source", port=source.port, extra=holder_args)
        wait_for(lambda: describe(restarted), 60, "the restarted source")
        progress = list(stub.Stage(request, timeout=120))
    final = progress[-1]
    assert final.state == "done"
    assert final.bytes_received == share - done
    assert final.chunks_refetched == 0
    held = read_layout(Path(final.path) / "model.safetensors")
    assert sorted(held) == names
    assert sum(t.info.nbytes for t in held.values()) == share


def test_a_worker_whose_cache_cannot_take_its_stage_is_refused_with_the_figure(
    tmp_path: Path,
) -> None:
    make_model(tmp_path / "holder" / "tiny", "llama", num_layers=4, shards=3, seed=7)
    with local_cluster(tmp_path) as c:
        c.worker(
            "w0",
            extra=("--model-dir", str(tmp_path / "holder"), "--cache-dir", str(tmp_path / "c0")),
        )
        c.worker("w1", extra=("--cache-dir", str(tmp_path / "c1"), "--cache-max-gb", "0.0001"))
        coord = c.coordinator("tiny", min_workers=2, layers="2,2")

        def refused() -> str:
            problem = list_nodes(coord).problem
            return problem if "short" in problem else ""

        problem = wait_for(refused, 60, "the plan to be refused")
    assert "w1 would fetch layers" in problem and "100.0 KB" not in problem
    assert "KiB free" in problem
    assert not (tmp_path / "c1" / "stages").exists()
