"""Model distribution across hosts of the namespace test bed: a cable pulled mid-transfer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from clusterkit import describe, wait_for, wait_serving
from modelfactory import make_model
from testbed import TestBed, bed_fixture

from pomona import rpc
from pomona.safetensors_layout import read_layout, weight_map
from pomona.stage_cache import StageKey, tensors_for_stage
from pomona.v1 import transfer_pb2, transfer_pb2_grpc, worker_pb2
from pomona.worker.transfer_fetch import CHUNK_BYTES

pytestmark = pytest.mark.netns

bed = bed_fixture(2)


def _share(model: Path, key: StageKey) -> tuple[dict[str, int], int]:
    sizes = {}
    for file in set(weight_map(model).values()):
        sizes.update({n: t.info.nbytes for n, t in read_layout(model / file).items()})
    return sizes, sum(sizes[n] for n in tensors_for_stage(list(sizes), key))


def _logged(partial: Path, sizes: dict[str, int]) -> int:
    done = set()
    for line in (partial / "chunks.log").read_text().splitlines():
        if line.startswith("-"):
            done.discard(line[1:])
        else:
            done.add(line.rsplit(" ", 1)[0])
    return sum(
        min(CHUNK_BYTES, sizes[k.rsplit("@", 1)[0]] - int(k.rsplit("@", 1)[1])) for k in done
    )


def test_a_transfer_cut_by_a_pulled_cable_resumes_once_it_is_back(
    bed: TestBed, tmp_path: Path
) -> None:
    model = make_model(
        tmp_path / "holder" / "big",
        "llama",
        num_layers=4,
        shards=2,
        overrides={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8},
    )
    key = StageKey.of(0, 4, 0, 1)
    sizes, share = _share(model, key)
    empty = tmp_path / "empty"
    empty.mkdir()
    source = bed.start_worker(
        0, "source", "lab", tmp_path / "holder", extra=["--cache-dir", str(tmp_path / "c0")]
    )
    receiver = bed.start_worker(
        1, "receiver", "lab", empty, extra=["--cache-dir", str(tmp_path / "c1")]
    )
    wait_for(lambda: describe(source) and describe(receiver), 120, "the workers")
    # About 65 MB at 100 Mbit/s: several seconds, so the cable is pulled mid-way.
    bed.throttle(1, rate="100mbit", burst="256kb", latency="400ms")
    stub = transfer_pb2_grpc.ModelTransferStub(
        rpc.channel(receiver.address, receiver.auth, describe(receiver).node_id)
    )
    request = transfer_pb2.StageRequest(
        model="big",
        start_layer=0,
        end_layer=4,
        rank=0,
        world_size=1,
        sources=[source.grpc_address],
        source_node_ids=[describe(source).node_id],
    )
    stages = tmp_path / "c1" / "stages"

    def some_logged() -> bool:
        logs = list(stages.glob("*/*.partial/chunks.log"))
        return bool(logs) and logs[0].stat().st_size > 0

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: list(stub.Stage(request, timeout=300)))
        wait_for(some_logged, 120, "the first chunks", interval=0.01)
        bed.link_down(1)
        with pytest.raises(grpc.RpcError) as cut:
            running.result(timeout=200)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    partial = next(stages.glob("*/*.partial"))
    done = _logged(partial, sizes)
    assert 0 < done < share
    bed.link_up(1)
    progress = list(stub.Stage(request, timeout=300))
    final = progress[-1]
    assert final.state == "done"
    assert final.bytes_received == share - done
    held = read_layout(Path(final.path) / "model.safetensors")
    assert sum(t.info.nbytes for t in held.values()) == share


def test_a_holder_loads_while_the_other_worker_still_fetches(bed: TestBed, tmp_path: Path) -> None:
    """Each worker's load starts once it holds its stage, not once every fetch is done."""
    make_model(
        tmp_path / "holder" / "big",
        "llama",
        num_layers=2,
        shards=1,
        overrides={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8},
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    holder = bed.start_worker(
        0,
        "holder",
        "lab2",
        tmp_path / "holder",
        extra=["--spare-runner", "--cache-dir", str(tmp_path / "c0")],
    )
    receiver = bed.start_worker(
        1, "receiver", "lab2", empty, extra=["--cache-dir", str(tmp_path / "c1")]
    )
    wait_for(lambda: describe(holder) and describe(receiver), 120, "the workers")
    # The receiver's half, about 16 MB, takes some 3 s at 40 Mbit/s.
    bed.throttle(1, rate="40mbit", burst="256kb", latency="400ms")
    coordinator = bed.start_coordinator(
        0,
        "big",
        "lab2",
        2,
        extra=[
            "--state-dir",
            str(tmp_path / "co"),
            "--objective",
            "throughput",
            "--parallel",
            "pipeline",
        ],  # fmt: skip,
    )
    fetching = tmp_path / "c1" / "stages"

    def holder_loaded_during_the_fetch() -> bool:
        shard = describe(holder).shard
        loaded = shard.load_id and (
            shard.state == worker_pb2.SHARD_STATE_CONNECTING or shard.progress >= 1.0
        )
        return bool(loaded) and bool(list(fetching.glob("*/*.partial")))

    wait_for(holder_loaded_during_the_fetch, 60, "the holder's load during the fetch", interval=0.1)
    assert wait_serving(coordinator, 120).serving
