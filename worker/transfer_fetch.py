"""Fetch exactly one stage's tensors from workers that hold them, verified and resumable.

The stage's tensors are cut into fixed-size chunks; several requests of a few
chunks each are in flight at once, and each chunk is checked against the
BLAKE3 digest the source computed from what it read. A chunk that fails the
check is fetched again; a source that fails is dropped and its chunks go to
the next. Progress is kept in the ``.partial`` folder (one line per verified
chunk), so a transfer cut off resumes without fetching a completed chunk
again. Once every chunk is there, the whole file is verified once more and the
folder renamed.

Tensors this stage shares with a peer (another worker fetching a stage of the
same model now, e.g. the tied embedding of the first and the last stage) are
fetched last and from the peer, chunk by chunk as the peer verifies them, so
that they cross the source's link once; a chunk the peer will not have comes
from the sources.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from blake3 import blake3

from pomona import rpc
from pomona.model_store import MAX_SMALL_FILE_BYTES, SMALL_FILES
from pomona.safetensors_layout import (
    ChunkSpan,
    LayoutError,
    TensorInfo,
    check_tensor,
    chunk_spans,
    header_for,
    layer_index,
    weight_index,
)
from pomona.security import Auth
from pomona.stage_cache import (
    DONE_LOG,
    PARTIAL,
    PLAN_FILE,
    WEIGHTS,
    StageCache,
    StageKey,
    read_chunks_log,
    tensors_for_stage,
    write_stage_meta,
)
from pomona.units import format_bytes
from pomona.v1 import transfer_pb2, transfer_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
REQUEST_BYTES = 16 << 20
MAX_CHUNKS_PER_REQUEST = 64
IN_FLIGHT = 8
CATALOG_TIMEOUT = 30.0
# A request's deadline grows with its bytes (at 10 MB/s at least).
READ_TIMEOUT_BASE = 30.0
BAD_CHUNKS_PER_SOURCE = 3
# A chunk a peer is still fetching is asked for again after PEER_RETRY_S; a peer
# that gives none of the chunks waited for in PEER_WAIT_S is given up.
PEER_RETRY_S = 0.2
PEER_WAIT_S = 60.0


class TransferError(RuntimeError):
    pass


@dataclass
class Progress:
    model: str
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_received: int = 0
    bytes_from_peers: int = 0
    refetched: int = 0
    source: str = ""
    state: str = "fetching"
    path: str = ""
    started: float = field(default_factory=time.monotonic)
    _rate_bytes: int = 0

    @property
    def bytes_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self._rate_bytes / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.bytes_per_s
        return (self.bytes_total - self.bytes_done) / rate if rate > 0 else None

    def to_proto(self) -> transfer_pb2.TransferProgress:
        return transfer_pb2.TransferProgress(
            model=self.model,
            state=self.state,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            bytes_per_s=self.bytes_per_s,
            eta_s=self.eta_s,
            source=self.source,
            bytes_received=self.bytes_received,
            chunks_refetched=self.refetched,
            path=self.path,
            bytes_from_peers=self.bytes_from_peers,
        )


@dataclass
class _Source:
    address: str
    stub: transfer_pb2_grpc.ModelTransferStub
    catalog: transfer_pb2.ModelCatalog
    tensors: dict[str, TensorInfo]
    bad_chunks: int = 0
    dead: str = ""
    # A peer: a worker fetching the same tensors now, which serves the chunks it verified.
    peer: bool = False
    # Since when chunks asked of this peer are all still coming.
    waiting_since: float | None = None


ChannelFactory = Callable[[str], grpc.aio.Channel]


async def fetch_stage(
    model: str,
    key: StageKey,
    sources: Sequence[str],
    cache: StageCache,
    auth: Auth | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    in_flight: int = IN_FLIGHT,
    keep: Sequence[Path] = (),
    targets: Mapping[str, str] | None = None,
    peers: Sequence[tuple[str, str, StageKey]] = (),
    peer_wait_s: float = PEER_WAIT_S,
) -> tuple[Path, Progress]:
    """The stage folder of ``key`` for ``model``, fetched from ``sources`` where missing.

    ``targets`` gives each source's node id, which calls to it are signed for.
    ``peers`` (address, node id, stage) are workers fetching stages of the same
    model now: the tensors shared with one are fetched last, from it.
    """
    progress = Progress(model)
    held = cache.find(model, key)
    if held is not None:
        cache.touch(held.path)
        progress.state, progress.path = "held", str(held.path)
        progress.bytes_total = progress.bytes_done = held.bytes
        return held.path, progress
    channels: list[grpc.aio.Channel] = []
    try:
        problems: list[str] = []
        found = await _catalogs(model, sources, auth, channels, problems, targets or {})
        if not found:
            raise TransferError(
                f"no source can give {model!r}: " + ("; ".join(problems) or "no worker holds it")
            )
        names, num_layers = _model_tensors(found)
        needed = tensors_for_stage(names, key)
        if not needed:
            raise TransferError(f"{model!r} has no tensors for layers [{key.start}, {key.end})")
        infos = _agreed_infos(needed, found)
        progress.source = found[0].address
        shared = _peers(model, names, infos, peers, auth, channels)
        job = _Job(model, key, num_layers, infos, cache, chunk_bytes, progress, on_progress)
        job.peers, job.peer_wait_s = shared, peer_wait_s
        await job.run(found, in_flight, keep)
        return job.final, progress
    finally:
        for ch in channels:
            await ch.close()


async def _catalogs(
    model: str,
    sources: Sequence[str],
    auth: Auth | None,
    channels: list[grpc.aio.Channel],
    problems: list[str],
    targets: Mapping[str, str],
) -> list[_Source]:
    async def one(address: str) -> _Source | None:
        channel = rpc.aio_channel(address, auth, targets.get(address, ""))
        channels.append(channel)
        stub = transfer_pb2_grpc.ModelTransferStub(channel)
        try:
            catalog = await stub.Catalog(
                transfer_pb2.CatalogRequest(model=model), timeout=CATALOG_TIMEOUT
            )
            tensors = {
                t.name: check_tensor(t.name, t.dtype, t.shape, t.nbytes) for t in catalog.tensors
            }
        except grpc.aio.AioRpcError as e:
            problems.append(rpc.describe_error(e, address))
            return None
        except LayoutError as e:
            problems.append(f"{address} describes {model} wrongly: {e}")
            return None
        return _Source(address, stub, catalog, tensors)

    found = await asyncio.gather(*(one(a) for a in dict.fromkeys(sources)))
    # Complete holders first: they know every tensor name of the model.
    return sorted((s for s in found if s is not None), key=lambda s: not s.catalog.complete)


def _peers(
    model: str,
    names: list[str],
    infos: list[TensorInfo],
    peers: Sequence[tuple[str, str, StageKey]],
    auth: Auth | None,
    channels: list[grpc.aio.Channel],
) -> list[_Source]:
    """The peers with tensors in common with this stage, each knowing only those."""
    mine = {t.name: t for t in infos}
    out = []
    for address, node_id, key in peers:
        shared = {n: mine[n] for n in tensors_for_stage(names, key) if n in mine}
        if not shared:
            continue
        channel = rpc.aio_channel(address, auth, node_id)
        channels.append(channel)
        stub = transfer_pb2_grpc.ModelTransferStub(channel)
        out.append(_Source(address, stub, transfer_pb2.ModelCatalog(), shared, peer=True))
        log.info("%s of %s will come from peer %s", ", ".join(shared), model, address)
    return out


def _model_tensors(sources: list[_Source]) -> tuple[list[str], int]:
    for s in sources:
        if s.catalog.complete:
            return list(s.tensors), s.catalog.num_layers
    # Only stage folders: together they are what is known of the model.
    names: dict[str, None] = {}
    for s in sources:
        names.update(dict.fromkeys(s.tensors))
    return list(names), max(s.catalog.num_layers for s in sources)


def _agreed_infos(needed: list[str], sources: list[_Source]) -> list[TensorInfo]:
    infos = []
    for name in needed:
        seen = {s.tensors[name] for s in sources if name in s.tensors}
        if len(seen) != 1:
            raise TransferError(
                f"sources disagree on tensor {name!r} (dtype, shape or size): "
                "they hold different versions of the model"
            )
        infos.append(seen.pop())
    return infos


class _Job:
    def __init__(
        self,
        model: str,
        key: StageKey,
        num_layers: int,
        infos: list[TensorInfo],
        cache: StageCache,
        chunk_bytes: int,
        progress: Progress,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.model, self.key, self.num_layers, self.infos = model, key, num_layers, infos
        self.cache = cache
        self.final = cache.folder(model, key)
        self.partial = self.final.with_name(self.final.name + PARTIAL)
        self.chunk_bytes = chunk_bytes
        self.spans = list(chunk_spans(infos, chunk_bytes))
        self.header, self.offsets = header_for(infos)
        self.progress = progress
        self.on_progress = on_progress
        self._last_report = 0.0
        progress.bytes_total = sum(t.nbytes for t in infos)
        self.digests: dict[str, str] = {}
        self.resumed: set[str] = set()
        self.peers: list[_Source] = []
        self.peer_wait_s = PEER_WAIT_S
        # Chunks a peer said it will not have: they come from the sources.
        self.from_sources: set[str] = set()

    def _peer_for(self, span: ChunkSpan) -> _Source | None:
        if span.key in self.from_sources:
            return None
        return next((p for p in self.peers if not p.dead and span.tensor in p.tensors), None)

    def _order(self, spans: list[ChunkSpan]) -> list[ChunkSpan]:
        """Tensors outside the layers (what another stage may share) first, so that a
        peer can take them early; tensors a peer fetches too, last, by when it has them."""
        shared = {n for p in self.peers for n in p.tensors}
        return sorted(spans, key=lambda s: (s.tensor in shared, layer_index(s.tensor) is not None))

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is not None and (force or now - self._last_report >= 0.2):
            self._last_report = now
            self.on_progress(self.progress)

    async def run(self, sources: list[_Source], in_flight: int, keep: Sequence[Path]) -> None:
        total = self.progress.bytes_total
        await asyncio.to_thread(self._prepare, total, keep)
        await self._small_files(sources)
        fd = os.open(self.partial / WEIGHTS, os.O_RDWR)
        try:
            with (self.partial / DONE_LOG).open("a") as done_log:
                for _ in range(3):
                    todo = deque(self._order([s for s in self.spans if s.key not in self.digests]))
                    self.progress.bytes_done = total - sum(s.length for s in todo)
                    self._report(force=True)
                    await self._fetch(todo, sources, fd, done_log, in_flight)
                    bad = await asyncio.to_thread(self._verify, fd)
                    if not bad:
                        break
                    log.warning("%d chunks of %s failed the final check", len(bad), self.final)
                    for k in bad:
                        del self.digests[k]
                        self.resumed.discard(k)
                    done_log.write("".join(f"-{k}\n" for k in bad))
                    done_log.flush()
                else:
                    raise TransferError(f"{self.final.name}: chunks keep failing their check")
            os.fsync(fd)
        finally:
            os.close(fd)
        await asyncio.to_thread(self._finish)
        self.progress.state, self.progress.path = "done", str(self.final)
        self.progress.bytes_done = total
        self._report(force=True)

    def _prepare(self, total: int, keep: Sequence[Path]) -> None:
        plan = {
            "model": self.model,
            "chunk_bytes": self.chunk_bytes,
            "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes] for t in self.infos],
        }
        plan_path = self.partial / PLAN_FILE
        if plan_path.is_file() and json.loads(plan_path.read_text()) == plan:
            self.digests = read_chunks_log(self.partial / DONE_LOG)
            self.resumed = set(self.digests)
            log.info(
                "resuming %s: %d of %d chunks already here",
                self.final,
                len(self.digests),
                len(self.spans),
            )
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        self.cache.evict(total, keep)
        free = self.cache.free_bytes()
        if total + len(self.header) > free:
            raise TransferError(
                f"stage {self.key.folder_name} of {self.model} needs {format_bytes(total)} "
                f"but {self.cache.root} has {format_bytes(free)} free"
            )
        self.partial.mkdir(parents=True)
        with (self.partial / WEIGHTS).open("wb") as f:
            f.write(self.header)
            f.truncate(len(self.header) + total)
        plan_path.write_text(json.dumps(plan))

    async def _small_files(self, sources: list[_Source]) -> None:
        source = next((s for s in sources if s.catalog.complete), sources[0])
        for entry in source.catalog.files:
            if entry.name not in SMALL_FILES or entry.size > MAX_SMALL_FILE_BYTES:
                raise TransferError(f"{source.address} offers a file it may not: {entry.name!r}")
            target = self.partial / entry.name
            if target.is_file() and target.stat().st_size == entry.size:
                continue
            try:
                reply = await source.stub.ReadFile(
                    transfer_pb2.ReadFileRequest(model=self.model, name=entry.name),
                    timeout=CATALOG_TIMEOUT,
                )
            except grpc.aio.AioRpcError as e:
                raise TransferError(rpc.describe_error(e, source.address)) from e
            target.write_bytes(reply.data)
        if not (self.partial / "config.json").is_file():
            raise TransferError(f"{source.address} has no config.json for {self.model!r}")

    async def _fetch(
        self,
        todo: deque[ChunkSpan],
        sources: list[_Source],
        fd: int,
        done_log: object,
        in_flight: int,
    ) -> None:
        failures: list[str] = []

        async def lane() -> None:
            while todo:
                batch = _take(todo, self._peer_for)
                source = self._peer_for(batch[0]) or next(
                    (
                        s
                        for s in sources
                        if not s.dead and all(c.tensor in s.tensors for c in batch)
                    ),
                    None,
                )
                if source is None:
                    todo.extendleft(reversed(batch))
                    why = "; ".join(f"{s.address}: {s.dead}" for s in sources if s.dead)
                    failures.append(why or "no source holds these tensors")
                    return
                self.progress.source = source.address
                await self._read(source, batch, todo, fd, done_log)

        await asyncio.gather(*(lane() for _ in range(in_flight)))
        if todo:
            self._report(force=True)
            raise TransferError(
                f"cannot fetch {len(todo)} chunks of {self.final.name}: "
                + (failures[0] if failures else "all sources failed")
            )

    async def _read(
        self,
        source: _Source,
        batch: list[ChunkSpan],
        todo: deque[ChunkSpan],
        fd: int,
        done_log: object,
    ) -> None:
        pending = {s.key: s for s in batch}
        coming: list[ChunkSpan] = []
        request = transfer_pb2.ReadChunksRequest(
            model=self.model,
            chunks=[
                transfer_pb2.ChunkRef(tensor=s.tensor, offset=s.offset, length=s.length)
                for s in batch
            ],
        )
        timeout = READ_TIMEOUT_BASE + sum(s.length for s in batch) / 10e6
        try:
            async for chunk in source.stub.ReadChunks(request, timeout=timeout):
                span = pending.pop(f"{chunk.ref.tensor}@{chunk.ref.offset}", None)
                if span is None or chunk.ref.length != span.length:
                    raise TransferError(f"{source.address} sent a chunk that was not asked for")
                if chunk.missing:
                    self._missing(source, span, chunk.coming, coming, todo)
                    continue
                self.progress.bytes_received += len(chunk.data)
                if source.peer:
                    self.progress.bytes_from_peers += len(chunk.data)
                self.progress._rate_bytes += len(chunk.data)
                at = len(self.header) + self.offsets[span.tensor] + span.offset
                digest = await asyncio.to_thread(_check_and_write, fd, chunk, span.length, at)
                if digest is None:
                    self.progress.refetched += 1
                    source.bad_chunks += 1
                    log.warning(
                        "chunk %s from %s failed its digest check: fetching it again",
                        span.key,
                        source.address,
                    )
                    if source.bad_chunks >= BAD_CHUNKS_PER_SOURCE:
                        source.dead = f"{source.bad_chunks} corrupted chunks"
                    todo.append(span)
                    continue
                self.digests[span.key] = digest
                source.waiting_since = None
                done_log.write(f"{span.key} {digest}\n")  # type: ignore[attr-defined]
                done_log.flush()  # type: ignore[attr-defined]
                self.progress.bytes_done += span.length
                self._report()
        except grpc.aio.AioRpcError as e:
            if source.peer and e.code() == grpc.StatusCode.NOT_FOUND:
                # A peer whose own transfer has not started yet: as if every chunk were coming.
                for span in list(pending.values()):
                    del pending[span.key]
                    self._missing(source, span, True, coming, todo)
            else:
                source.dead = rpc.describe_error(e, source.address)
                log.warning("source %s failed: %s", source.address, source.dead)
        except TransferError as e:
            source.dead = str(e)
        todo.extend(pending.values())
        if coming:
            await asyncio.sleep(PEER_RETRY_S)
            todo.extend(coming)

    def _missing(
        self,
        source: _Source,
        span: ChunkSpan,
        coming: bool,
        waiting: list[ChunkSpan],
        todo: deque[ChunkSpan],
    ) -> None:
        """A chunk ``source`` has not got: wait for a peer that is fetching it, else the sources."""
        if not source.peer:
            # A source offers only what it holds whole: this one is broken.
            source.bad_chunks += 1
            if source.bad_chunks >= BAD_CHUNKS_PER_SOURCE:
                source.dead = f"{source.bad_chunks} chunks it offered and did not have"
            todo.append(span)
            return
        now = time.monotonic()
        if coming:
            source.waiting_since = source.waiting_since or now
            if now - source.waiting_since <= self.peer_wait_s:
                waiting.append(span)
                return
            source.dead = f"gave none of the chunks it is fetching in {self.peer_wait_s:.0f} s"
            log.warning("peer %s %s: fetching from the sources", source.address, source.dead)
        self.from_sources.add(span.key)
        todo.append(span)

    def _verify(self, fd: int) -> list[str]:
        """Chunks recorded by an earlier run whose bytes on disk no longer match.

        Chunks written by this run were hashed just before being written; those
        of a run that was cut off may have been recorded but not written.
        """
        bad = []
        for span in self.spans:
            if span.key not in self.resumed:
                continue
            at = len(self.header) + self.offsets[span.tensor] + span.offset
            data = os.pread(fd, span.length, at)
            if blake3(data).hexdigest() != self.digests.get(span.key):
                bad.append(span.key)
        return bad

    def _finish(self) -> None:
        names = [t.name for t in self.infos]
        total = self.progress.bytes_total
        (self.partial / "model.safetensors.index.json").write_text(
            weight_index({WEIGHTS: names}, total)
        )
        write_stage_meta(self.partial, self.model, self.key, self.num_layers, total, names)
        for name in (PLAN_FILE, DONE_LOG):
            (self.partial / name).unlink()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.partial.rename(self.final)
        log.info("stage folder %s complete (%s)", self.final, format_bytes(total))


def _check_and_write(fd: int, chunk: transfer_pb2.Chunk, length: int, at: int) -> str | None:
    """The chunk's BLAKE3 once written at ``at``; None (nothing written) if it is corrupt."""
    data = chunk.data
    digest = blake3(data).digest()
    if chunk.blake3:
        good = digest == chunk.blake3
    else:  # a source from before BLAKE3
        good = bool(chunk.sha256) and hashlib.sha256(data).digest() == chunk.sha256
    if len(data) != length or not good:
        return None
    os.pwrite(fd, data, at)
    return digest.hex()


def _take(
    todo: deque[ChunkSpan], group: Callable[[ChunkSpan], object] = lambda span: None
) -> list[ChunkSpan]:
    """The next request's chunks: up to REQUEST_BYTES, all of one ``group`` (one peer, or none)."""
    batch: list[ChunkSpan] = []
    size = 0
    while todo and len(batch) < MAX_CHUNKS_PER_REQUEST:
        if batch and (
            size + todo[0].length > REQUEST_BYTES or group(todo[0]) is not group(batch[0])
        ):
            break
        span = todo.popleft()
        batch.append(span)
        size += span.length
    return batch
