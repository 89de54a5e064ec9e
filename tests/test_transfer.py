"""Fetching one stage's tensors between workers over real gRPC: share, integrity, resume, trust."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import mlx.core as mx
import pytest
from modelfactory import ARCHITECTURES, make_model

from pomona import rpc
from pomona.model_store import ModelStore
from pomona.models import resolve_model
from pomona.safetensors_layout import LayoutError, read_layout
from pomona.security import Auth, ClusterSecrets
from pomona.stage_cache import (
    STAGE_META,
    StageCache,
    StageKey,
    tensors_for_stage,
    write_stage_meta,
)
from pomona.v1 import transfer_pb2, transfer_pb2_grpc
from pomona.worker.shard import StageSpec, load_stage, weight_map
from pomona.worker.transfer_fetch import TransferError, fetch_stage
from pomona.worker.transfer_service import TransferService

SMALL_CHUNK = 4096


def run(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test in its own event loop (fixtures pass through)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny", "llama", num_layers=6, shards=3)
    return root


def store_for(model_dirs: tuple[Path, ...], cache: Path) -> ModelStore:
    def resolve(name: str) -> Path:
        return resolve_model(name, model_dirs, hf_cache=cache / "no-hf")

    return ModelStore(resolve, model_dirs, StageCache(cache), hf_cache=cache / "no-hf")


@asynccontextmanager
async def source(
    service: TransferService, auth: Auth | None = None
) -> AsyncIterator[tuple[str, grpc.aio.Server]]:
    server = rpc.aio_server(auth)
    transfer_pb2_grpc.add_ModelTransferServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        await server.stop(None)


def share_bytes(model: Path, key: StageKey) -> int:
    layout = {}
    for file in set(weight_map(model).values()):
        layout.update(read_layout(model / file))
    return sum(layout[n].info.nbytes for n in tensors_for_stage(list(layout), key))


def test_a_stage_needs_its_layers_and_the_ends_only_where_it_uses_them() -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.mlp.weight" for i in range(4)
    ]
    assert tensors_for_stage(names, StageKey.of(1, 3, 1, 3)) == [
        "model.layers.1.mlp.weight",
        "model.layers.2.mlp.weight",
    ]
    assert tensors_for_stage(names, StageKey.of(0, 1, 0, 3)) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.weight",
    ]
    assert tensors_for_stage(names, StageKey.of(3, 4, 2, 3)) == [
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.3.mlp.weight",
    ]
    tied = [n for n in names if n != "lm_head.weight"]
    assert "model.embed_tokens.weight" in tensors_for_stage(tied, StageKey.of(3, 4, 2, 3))


@run
async def test_a_fetched_stage_holds_only_its_share_and_loads_like_the_original(
    models: Path, tmp_path: Path
) -> None:
    service = TransferService(store_for((models,), tmp_path / "src-cache"), None)
    cache = StageCache(tmp_path / "cache")
    key = StageKey.of(2, 4, 1, 3)
    async with source(service) as (address, _):
        path, progress = await fetch_stage("tiny", key, [address], cache, chunk_bytes=SMALL_CHUNK)
    assert path == cache.folder("tiny", key)
    expected = share_bytes(models / "tiny", key)
    assert progress.bytes_received == expected
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(
        n
        for n in weight_map(models / "tiny")
        if n.startswith(("model.layers.2.", "model.layers.3."))
    )
    assert sum(t.info.nbytes for t in read_layout(path / "model.safetensors").values()) == expected
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(path.parent.glob("*.partial"))
    mine = load_stage(path, StageSpec(2, 4, 1, 3))
    theirs = load_stage(models / "tiny", StageSpec(2, 4, 1, 3))
    assert mine.weights_bytes == theirs.weights_bytes
    for (name, a), (_, b) in zip(
        sorted(_params(mine.model)), sorted(_params(theirs.model)), strict=True
    ):
        assert mx.array_equal(a, b), name
    # Held now: asking again fetches nothing.
    again, progress = await fetch_stage("tiny", key, [], cache)
    assert again == path and progress.state == "held" and progress.bytes_received == 0


def _params(model: object) -> Iterator[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    for name, value in tree_flatten(model.parameters()):  # type: ignore[attr-defined]
        if ".layers.2." in name or ".layers.3." in name:
            yield name, value


class Flipping(TransferService):
    """A source whose first chunks arrive with one byte flipped after hashing."""

    def __init__(self, *args: object, flips: int = 1) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.flips = flips
        self.sent: list[str] = []
        self.flipped_bytes = 0

    def chunk(self, ref: transfer_pb2.ChunkRef, data: bytes, digest: bytes) -> transfer_pb2.Chunk:
        out = super().chunk(ref, data, digest)
        self.sent.append(f"{ref.tensor}@{ref.offset}")
        if self.flips and data:
            self.flips -= 1
            self.flipped_bytes += len(data)
            out.data = bytes([data[0] ^ 0x01]) + data[1:]
        return out


@run
async def test_a_flipped_byte_is_detected_and_the_chunk_fetched_again(
    models: Path, tmp_path: Path
) -> None:
    service = Flipping(store_for((models,), tmp_path / "src"), None, flips=2)
    cache = StageCache(tmp_path / "cache")
    key = StageKey.of(0, 2, 0, 3)
    async with source(service) as (address, _):
        path, progress = await fetch_stage("tiny", key, [address], cache, chunk_bytes=SMALL_CHUNK)
    assert progress.refetched == 2
    expected = share_bytes(models / "tiny", key)
    assert progress.bytes_received == expected + service.flipped_bytes
    theirs = {
        n: loc
        for f in set(weight_map(models / "tiny").values())
        for n, loc in read_layout(models / "tiny" / f).items()
    }
    for name, loc in read_layout(path / "model.safetensors").items():
        with open(path / "model.safetensors", "rb") as a, open(theirs[name].path, "rb") as b:
            a.seek(loc.start)
            b.seek(theirs[name].start)
            assert a.read(loc.info.nbytes) == b.read(loc.info.nbytes), name


class Sha256Source(Flipping):
    """A source from before BLAKE3: its chunks carry a sha256 only."""

    def chunk(self, ref: transfer_pb2.ChunkRef, data: bytes, digest: bytes) -> transfer_pb2.Chunk:
        out = super().chunk(ref, data, digest)
        out.ClearField("blake3")
        out.sha256 = hashlib.sha256(data).digest()
        return out


@run
async def test_an_older_source_with_sha256_digests_is_checked_by_sha256(
    models: Path, tmp_path: Path
) -> None:
    service = Sha256Source(store_for((models,), tmp_path / "src"), None, flips=1)
    cache = StageCache(tmp_path / "cache")
    key = StageKey.of(2, 4, 1, 3)
    async with source(service) as (address, _):
        path, progress = await fetch_stage("tiny", key, [address], cache, chunk_bytes=SMALL_CHUNK)
    assert progress.refetched == 1  # the flipped chunk failed its sha256 check
    assert progress.bytes_received == share_bytes(models / "tiny", key) + service.flipped_bytes
    assert (path / "model.safetensors").is_file()


class Dying(TransferService):
    """A source that stops answering after ``limit`` chunks (as if killed)."""

    def __init__(self, *args: object, limit: int) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.limit = limit
        self.sent: list[str] = []
        self.sent_bytes = 0

    def chunk(self, ref: transfer_pb2.ChunkRef, data: bytes, digest: bytes) -> transfer_pb2.Chunk:
        if len(self.sent) >= self.limit:
            raise RuntimeError("source killed")
        self.sent.append(f"{ref.tensor}@{ref.offset}")
        self.sent_bytes += len(data)
        return super().chunk(ref, data, digest)


@run
async def test_a_cut_transfer_resumes_from_another_holder_without_resending_chunks(
    models: Path, tmp_path: Path
) -> None:
    dying = Dying(store_for((models,), tmp_path / "a"), None, limit=10)
    spare = Flipping(store_for((models,), tmp_path / "b"), None, flips=0)
    cache = StageCache(tmp_path / "cache")
    key = StageKey.of(0, 3, 0, 2)
    expected = share_bytes(models / "tiny", key)
    async with source(dying) as (a, _):
        with pytest.raises(TransferError):
            await fetch_stage("tiny", key, [a], cache, chunk_bytes=SMALL_CHUNK, in_flight=1)
    assert len(dying.sent) == 10
    partial = cache.folder("tiny", key).with_name(cache.folder("tiny", key).name + ".partial")
    assert partial.is_dir() and not cache.folder("tiny", key).exists()
    async with source(spare) as (b, _):
        path, progress = await fetch_stage(
            "tiny", key, [a, b], cache, chunk_bytes=SMALL_CHUNK, in_flight=3
        )
    assert not set(dying.sent) & set(spare.sent)
    assert progress.bytes_received == expected - dying.sent_bytes
    assert sum(t.info.nbytes for t in read_layout(path / "model.safetensors").values()) == expected


@run
async def test_a_peer_serves_the_chunks_it_verified_and_the_source_only_the_rest(
    tmp_path: Path,
) -> None:
    """Fan-out: the last stage takes the tied embedding from the first stage's
    ``.partial`` folder, chunk by chunk; the chunks that peer lacks come from the source."""
    model = make_model(tmp_path / "m" / "tied", "qwen2", num_layers=3, shards=2, seed=5)
    embed = "model.embed_tokens.weight"
    nbytes = read_layout(model / weight_map(model)[embed])[embed].info.nbytes
    src = Dying(store_for((tmp_path / "m",), tmp_path / "src"), None, limit=10)
    first, last = StageKey.of(0, 1, 0, 3), StageKey.of(2, 3, 2, 3)
    peer = TransferService(store_for((), tmp_path / "peer"), None)
    async with source(src) as (s, _), source(peer) as (p, _):
        # The first stage fetches tensors outside the layers first: cut in its embedding.
        with pytest.raises(TransferError):
            await fetch_stage(
                "tied", first, [s], StageCache(tmp_path / "peer"), chunk_bytes=SMALL_CHUNK,
                in_flight=1,
            )  # fmt: skip
        had = [k for k in src.sent if k.startswith(f"{embed}@")]
        assert 0 < len(had) < nbytes // SMALL_CHUNK
        src.limit = 1 << 30
        path, progress = await fetch_stage(
            "tied", last, [s], StageCache(tmp_path / "follower"), chunk_bytes=SMALL_CHUNK,
            peers=[(p, "", first)],
        )  # fmt: skip
    sent = [k for k in src.sent if k.startswith(f"{embed}@")]
    # Every chunk of the embedding left the source once, to one receiver or the other.
    assert len(sent) == len(set(sent)) == -(-nbytes // SMALL_CHUNK)
    assert progress.bytes_from_peers == len(had) * SMALL_CHUNK
    assert peer.bytes_sent == {embed: len(had) * SMALL_CHUNK}
    held = read_layout(path / "model.safetensors")[embed]
    original = read_layout(model / weight_map(model)[embed])[embed]
    with open(path / "model.safetensors", "rb") as a, open(original.path, "rb") as b:
        a.seek(held.start)
        b.seek(original.start)
        assert a.read(nbytes) == b.read(nbytes)


@run
async def test_a_receiver_waits_for_a_peer_that_has_not_started_fetching_yet(
    tmp_path: Path,
) -> None:
    model = make_model(tmp_path / "m" / "tied", "qwen2", num_layers=3, shards=2, seed=5)
    embed = "model.embed_tokens.weight"
    nbytes = read_layout(model / weight_map(model)[embed])[embed].info.nbytes
    src = Dying(store_for((tmp_path / "m",), tmp_path / "src"), None, limit=1 << 30)
    peer = TransferService(store_for((), tmp_path / "peer"), None)
    first, last = StageKey.of(0, 1, 0, 3), StageKey.of(2, 3, 2, 3)
    async with source(src) as (s, _), source(peer) as (p, _):
        follower = asyncio.create_task(
            fetch_stage("tied", last, [s], StageCache(tmp_path / "f"), peers=[(p, "", first)])
        )
        await asyncio.sleep(0.5)  # the peer answers NOT_FOUND meanwhile: the follower waits
        assert not follower.done()
        channel = rpc.aio_channel(p)
        request = transfer_pb2.StageRequest(
            model="tied", start_layer=0, end_layer=1, rank=0, world_size=3, sources=[s]
        )
        states = [
            x.state async for x in transfer_pb2_grpc.ModelTransferStub(channel).Stage(request)
        ]
        await channel.close()
        path, progress = await follower
    assert states[-1] == "done"
    assert [k for k in src.sent if k.startswith(f"{embed}@")] == [f"{embed}@0"]
    assert progress.bytes_from_peers == nbytes
    load_stage(path, StageSpec(2, 3, 2, 3))


@run
async def test_a_worker_that_received_a_stage_serves_it_on(models: Path, tmp_path: Path) -> None:
    first = StageCache(tmp_path / "first")
    key = StageKey.of(2, 4, 1, 3)
    async with source(TransferService(store_for((models,), tmp_path / "s"), None)) as (a, _):
        await fetch_stage("tiny", key, [a], first)
    relay = TransferService(store_for((), tmp_path / "first"), None)
    async with source(relay) as (b, _):
        path, progress = await fetch_stage("tiny", key, [b], StageCache(tmp_path / "second"))
    assert progress.bytes_received == share_bytes(models / "tiny", key)
    load_stage(path, StageSpec(2, 4, 1, 3))


@run
async def test_bad_requests_are_refused_with_a_clear_status(models: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_model(outside / "secret", "llama", num_layers=2, shards=1)
    service = TransferService(store_for((models,), tmp_path / "c"), None)
    async with source(service) as (address, _):
        stub = transfer_pb2_grpc.ModelTransferStub(grpc.aio.insecure_channel(address))

        async def code(call: object) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                result = call
                if hasattr(result, "__aiter__"):
                    async for _ in result:  # type: ignore[attr-defined]
                        pass
                else:
                    await result  # type: ignore[misc]
            return e.value.code()

        read = transfer_pb2.ReadChunksRequest
        ref = transfer_pb2.ChunkRef
        assert await code(stub.Catalog(transfer_pb2.CatalogRequest(model="../outside/secret"))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await code(stub.Catalog(transfer_pb2.CatalogRequest(model=str(outside / "secret"))))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await code(
                stub.ReadChunks(read(model="tiny", chunks=[ref(tensor="no.such.tensor", length=4)]))
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code(
                stub.ReadChunks(
                    read(
                        model="tiny",
                        chunks=[ref(tensor="model.norm.weight", offset=0, length=1 << 40)],
                    )
                )
            )
            == grpc.StatusCode.OUT_OF_RANGE
        )
        for name in ("model-00001-of-00003.safetensors", "../../etc/passwd", "/etc/passwd"):
            assert (
                await code(stub.ReadFile(transfer_pb2.ReadFileRequest(model="tiny", name=name)))
                == grpc.StatusCode.PERMISSION_DENIED
            )
        await stub.ReadFile(transfer_pb2.ReadFileRequest(model="tiny", name="config.json"))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.safetensors"))


def test_a_header_claiming_a_terabyte_tensor_is_refused(tmp_path: Path) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}
    ).encode()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(LayoutError, match="past the file"):
        read_layout(bad)
    bad.write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    with pytest.raises(LayoutError, match="claims a header"):
        read_layout(bad)


@run
async def test_a_source_that_claims_an_absurd_tensor_writes_nothing(
    models: Path, tmp_path: Path
) -> None:
    class Lying(TransferService):
        async def Catalog(self, request, context):  # noqa: N802
            reply = await super().Catalog(request, context)
            reply.tensors[0].shape[:] = [1 << 40]
            reply.tensors[0].nbytes = 1 << 42
            return reply

    cache = StageCache(tmp_path / "cache")
    async with source(Lying(store_for((models,), tmp_path / "s"), None)) as (address, _):
        with pytest.raises(TransferError, match="claims 4398046511104 bytes, over the limit"):
            await fetch_stage("tiny", StageKey.of(0, 6, 0, 1), [address], cache)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


@run
async def test_transfers_need_the_cluster_credentials(models: Path, tmp_path: Path) -> None:
    auth = Auth(ClusterSecrets.generate("c1"))
    service = TransferService(store_for((models,), tmp_path / "s"), auth)
    async with source(service, auth) as (address, _):
        with pytest.raises(TransferError):
            await fetch_stage(
                "tiny", StageKey.of(0, 6, 0, 1), [address], StageCache(tmp_path / "x")
            )
        path, _ = await fetch_stage(
            "tiny", StageKey.of(0, 6, 0, 1), [address], StageCache(tmp_path / "y"), auth
        )
    assert path.is_dir()


def test_the_cache_evicts_least_recently_used_folders_that_no_runner_uses(tmp_path: Path) -> None:
    cache = StageCache(tmp_path, max_bytes=300)
    folders = []
    for i in range(3):
        key = StageKey(i, i + 1, False, False)
        path = cache.folder("m", key)
        path.mkdir(parents=True)
        write_stage_meta(path, "m", key, 3, 100, [])
        os.utime(path / STAGE_META, (1000 + i, 1000 + i))
        folders.append(path)
    cache.touch(folders[1])  # used now: the most recent
    removed = cache.evict(100, keep=[folders[0]])
    assert removed == [folders[2]]
    assert folders[0].exists() and folders[1].exists() and not folders[2].exists()
    assert StageCache(tmp_path).evict(10**9) == []  # no limit, no eviction


def test_a_worker_reports_a_model_by_the_name_it_is_asked_for(models: Path, tmp_path: Path) -> None:
    store = store_for((models,), tmp_path / "cache")
    assert [(h.model, h.complete) for h in store.held()] == [("tiny", True)]
    absolute = str(models / "tiny")
    held = store.held(absolute)
    assert (held[0].model, held[0].complete) == (absolute, True)
    assert store.held("elsewhere/unknown") == []


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@run
async def test_every_stage_of_every_architecture_loads_from_what_it_was_sent(
    arch: str, tmp_path: Path
) -> None:
    model = make_model(tmp_path / "models" / arch, arch, num_layers=3, shards=2)
    service = TransferService(store_for((tmp_path / "models",), tmp_path / "src"), None)
    cache = StageCache(tmp_path / "cache")
    async with source(service) as (address, _):
        for rank, (start, end) in enumerate(((0, 1), (1, 2), (2, 3))):
            key = StageKey.of(start, end, rank, 3)
            path, progress = await fetch_stage(arch, key, [address], cache)
            assert progress.bytes_received == share_bytes(model, key)
            mine = load_stage(path, StageSpec(start, end, rank, 3))
            theirs = load_stage(model, StageSpec(start, end, rank, 3))
            assert mine.weights_bytes == theirs.weights_bytes, (arch, rank)
