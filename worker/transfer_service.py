"""The ModelTransfer service of a worker daemon: serve what it holds, fetch what it lacks.

Thin: requests are checked here and answered from ``ModelStore`` (serving) and
``transfer_fetch`` (fetching); errors leave as status codes with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from blake3 import blake3

from pomona.models import ModelNotFound, ModelRefused, check_model_name
from pomona.safetensors_layout import LayoutError
from pomona.security import Auth
from pomona.v1 import transfer_pb2, transfer_pb2_grpc
from pomona.worker.model_store import MAX_SMALL_FILE_BYTES, SMALL_FILES, Holding, ModelStore
from pomona.worker.stage_cache import StageKey
from pomona.worker.transfer_fetch import Progress, TransferError, fetch_stage

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_REQUEST = 256
MAX_CHUNK_BYTES = 8 << 20
MAX_SOURCES = 64


class TransferService(transfer_pb2_grpc.ModelTransferServicer):
    def __init__(
        self,
        store: ModelStore,
        auth: Auth | None,
        in_use: Callable[[], list[Path]] = list,
        on_survey: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        # Called when a coordinator surveys for a model (a plan, and a load, follow).
        self.on_survey = on_survey
        self.auth = auth
        self.in_use = in_use
        # The transfer under way (or last finished) per stage folder, for status.
        self.transfers: dict[str, Progress] = {}
        self.bytes_received_total = 0
        self._locks: dict[Path, asyncio.Lock] = {}

    async def _holding(self, model: str, context: grpc.aio.ServicerContext) -> Holding:
        try:
            check_model_name(model)
            return await asyncio.to_thread(self.store.holding, model)
        except ModelRefused as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except (OSError, LayoutError) as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot read {model!r}: {e}")
        raise AssertionError("abort raises")

    async def ListModels(self, request, context):  # noqa: N802
        model = request.model
        if model:
            try:
                check_model_name(model)
            except ModelNotFound as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if model and self.on_survey is not None:
            await self.on_survey()
        held = await asyncio.to_thread(self.store.held, model)
        cache = self.store.cache
        return transfer_pb2.ListModelsReply(
            models=[
                transfer_pb2.HeldModel(
                    model=h.model,
                    complete=h.complete,
                    bytes=h.bytes,
                    num_layers=h.num_layers,
                    stages=[
                        transfer_pb2.LayerRange(
                            start_layer=k.start, end_layer=k.end, first=k.first, last=k.last
                        )
                        for k in h.stages
                    ],
                )
                for h in held
            ],
            cache_dir=str(cache.root),
            cache_free_bytes=await asyncio.to_thread(cache.free_bytes),
            cache_used_bytes=await asyncio.to_thread(cache.used_bytes),
            cache_max_bytes=cache.max_bytes,
        )

    async def Catalog(self, request, context):  # noqa: N802
        h = await self._holding(request.model, context)
        return transfer_pb2.ModelCatalog(
            model=request.model,
            complete=h.complete,
            num_layers=h.num_layers,
            tensors=[
                transfer_pb2.TensorEntry(
                    name=name, dtype=loc.info.dtype, shape=loc.info.shape, nbytes=loc.info.nbytes
                )
                for name, loc in h.tensors.items()
            ],
            files=[transfer_pb2.FileEntry(name=n, size=s) for n, s in h.small_files().items()],
        )

    async def ReadFile(self, request, context):  # noqa: N802
        if request.name not in SMALL_FILES:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{request.name[:80]!r} is not a config or tokenizer file: only "
                f"{', '.join(sorted(SMALL_FILES))} are served",
            )
        h = await self._holding(request.model, context)
        files = h.small_files()
        if h.files_dir is None or request.name not in files:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"{request.model!r} has no {request.name}"
            )
        if files[request.name] > MAX_SMALL_FILE_BYTES:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{request.name} is over {MAX_SMALL_FILE_BYTES} bytes",
            )
        data = await asyncio.to_thread((h.files_dir / request.name).read_bytes)
        return transfer_pb2.FileData(name=request.name, data=data)

    async def ReadChunks(self, request, context) -> AsyncIterator[transfer_pb2.Chunk]:  # noqa: N802
        if len(request.chunks) > MAX_CHUNKS_PER_REQUEST:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.chunks)} chunks in one request: at most {MAX_CHUNKS_PER_REQUEST}",
            )
        h = await self._holding(request.model, context)
        for ref in request.chunks:
            loc = h.tensors.get(ref.tensor)
            if loc is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"{request.model!r} has no tensor {ref.tensor[:120]!r} here",
                )
            if ref.length > MAX_CHUNK_BYTES or ref.offset + ref.length > loc.info.nbytes:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"bytes [{ref.offset}, {ref.offset + ref.length}) of {ref.tensor!r}: the "
                    f"tensor has {loc.info.nbytes} bytes and a chunk at most {MAX_CHUNK_BYTES}",
                )
        fds: dict[Path, int] = {}

        def read(ref: transfer_pb2.ChunkRef) -> tuple[bytes, bytes]:
            loc = h.tensors[ref.tensor]
            if loc.path not in fds:
                fds[loc.path] = os.open(loc.path, os.O_RDONLY)
            data = os.pread(fds[loc.path], ref.length, loc.start + ref.offset)
            return data, blake3(data).digest()

        refs = list(request.chunks)
        # One chunk is read and hashed (in a thread) while the previous one is sent.
        ahead = asyncio.ensure_future(asyncio.to_thread(read, refs[0])) if refs else None
        try:
            for i, ref in enumerate(refs):
                assert ahead is not None
                data, digest = await ahead
                ahead = (
                    asyncio.ensure_future(asyncio.to_thread(read, refs[i + 1]))
                    if i + 1 < len(refs)
                    else None
                )
                if len(data) != ref.length:
                    await context.abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"the file of {ref.tensor!r} is shorter than its header says",
                    )
                yield self.chunk(ref, data, digest)
        finally:
            if ahead is not None:
                with contextlib.suppress(BaseException):
                    await ahead
            for fd in fds.values():
                os.close(fd)

    def chunk(self, ref: transfer_pb2.ChunkRef, data: bytes, digest: bytes) -> transfer_pb2.Chunk:
        """The reply for one chunk (a seam for tests that corrupt or cut replies)."""
        return transfer_pb2.Chunk(ref=ref, data=data, blake3=digest)

    async def Stage(self, request, context) -> AsyncIterator[transfer_pb2.TransferProgress]:  # noqa: N802
        problem = _check_stage(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        key = StageKey.of(request.start_layer, request.end_layer, request.rank, request.world_size)
        folder = self.store.cache.folder(request.model, key)
        queue: asyncio.Queue[Progress | BaseException | None] = asyncio.Queue()

        def report(p: Progress) -> None:
            queue.put_nowait(p)

        async def run() -> None:
            try:
                await self.fetch(request, key, report)
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                queue.put_nowait(e)
            finally:
                queue.put_nowait(None)

        lock = self._locks.setdefault(folder, asyncio.Lock())
        async with lock:
            task = asyncio.create_task(run())
            try:
                while (item := await queue.get()) is not None:
                    if isinstance(item, TransferError):
                        await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                    if isinstance(item, (OSError, LayoutError)):
                        await context.abort(grpc.StatusCode.INTERNAL, f"transfer failed: {item}")
                    if isinstance(item, BaseException):
                        raise item
                    yield item.to_proto()
            finally:
                task.cancel()

    def _holds_whole(self, model: str) -> Holding | None:
        try:
            holding = self.store.holding(model)
        except (ModelNotFound, OSError, LayoutError):
            return None
        return holding if holding.complete else None

    async def fetch(
        self, request: transfer_pb2.StageRequest, key: StageKey, report: Callable[[Progress], None]
    ) -> tuple[Path, Progress]:
        """Fetches (or finds) a stage folder, keeping its progress for status."""
        label = f"{request.model} {key.folder_name}"
        received = 0

        def on_progress(p: Progress) -> None:
            nonlocal received
            self.bytes_received_total += p.bytes_received - received
            received = p.bytes_received
            self.transfers[label] = p
            report(p)

        whole = await asyncio.to_thread(self._holds_whole, request.model)
        if whole is not None:
            progress = Progress(request.model, state="held", path=str(whole.files_dir))
            progress.bytes_total = progress.bytes_done = whole.bytes
            on_progress(progress)
            return Path(str(whole.files_dir)), progress
        path, progress = await fetch_stage(
            request.model,
            key,
            list(request.sources),
            self.store.cache,
            self.auth,
            on_progress=on_progress,
            keep=self.in_use(),
            targets=dict(zip(request.sources, request.source_node_ids, strict=False)),
        )
        on_progress(progress)
        return path, progress


def _check_stage(r: transfer_pb2.StageRequest) -> str:
    try:
        check_model_name(r.model)
    except ModelNotFound as e:
        return str(e)
    if not 1 <= r.world_size <= 256 or not 0 <= r.rank < r.world_size:
        return f"rank {r.rank} of {r.world_size} is not a stage of a pipeline"
    if not 0 <= r.start_layer < r.end_layer <= 100_000:
        return f"the layer range [{r.start_layer}, {r.end_layer}) is empty or negative"
    if len(r.sources) > MAX_SOURCES:
        return f"{len(r.sources)} sources: at most {MAX_SOURCES}"
    if r.source_node_ids and len(r.source_node_ids) != len(r.sources):
        return "source_node_ids must name every source, in order"
    return ""
