"""Serving the models held here to workers that fetch them: the read half of ModelTransfer.

Served by every worker daemon (``pomona.worker.transfer_service`` adds the
fetching half, ``Stage``) and by a coordinator with ``--model-dir``. Requests
are checked here and answered from a ``ModelStore``: only tensors named in a
safetensors header of a held folder, and only config and tokenizer files, are
ever read; errors leave as status codes with one line.
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

from pomona.model_profile import ModelProfile
from pomona.model_store import MAX_SMALL_FILE_BYTES, SMALL_FILES, Holding, ModelStore
from pomona.models import ModelNotFound, ModelRefused, check_model_name
from pomona.safetensors_layout import LayoutError, TensorLocation
from pomona.v1 import transfer_pb2, transfer_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_REQUEST = 256
MAX_CHUNK_BYTES = 8 << 20


class ModelSource(transfer_pb2_grpc.ModelTransferServicer):
    """ListModels, Catalog, ReadFile and ReadChunks over ``store``; Stage is refused."""

    def __init__(
        self, store: ModelStore, on_survey: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.store = store
        # Called when a coordinator surveys for a model (a plan, and a load, follow).
        self.on_survey = on_survey
        # Tensor bytes read and sent, in all and per tensor name.
        self.bytes_sent_total = 0
        self.bytes_sent: dict[str, int] = {}

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
        reply = transfer_pb2.ListModelsReply(
            models=held_models(held), bytes_sent=self.bytes_sent_total
        )
        cache = self.store.cache
        if cache is not None:
            reply.cache_dir = str(cache.root)
            reply.cache_free_bytes = await asyncio.to_thread(cache.free_bytes)
            reply.cache_used_bytes = await asyncio.to_thread(cache.used_bytes)
            reply.cache_max_bytes = cache.max_bytes
        return reply

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

    def coming(self, model: str, folder: Path | None) -> bool:
        """Whether the chunks missing from ``folder`` (a ``.partial`` folder; None: any
        of ``model``) are being fetched here now. Only a worker fetches."""
        return False

    async def ReadChunks(self, request, context) -> AsyncIterator[transfer_pb2.Chunk]:  # noqa: N802
        """Chunks of the tensors held here, and the verified chunks of stages still arriving.

        A chunk of a stage still arriving that is not verified yet is answered
        ``missing`` (and ``coming`` while it is being fetched), not an error:
        the asker takes it from elsewhere or asks again.
        """
        model = request.model
        if len(request.chunks) > MAX_CHUNKS_PER_REQUEST:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.chunks)} chunks in one request: at most {MAX_CHUNKS_PER_REQUEST}",
            )
        try:
            check_model_name(model)
            partial = await asyncio.to_thread(self.store.partial_tensors, model)
        except ModelRefused as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        whole: dict[str, TensorLocation] = {}
        if not partial and not self.coming(model, None):
            whole = (await self._holding(model, context)).tensors
        else:
            with contextlib.suppress(ModelNotFound, OSError, LayoutError):
                whole = (await asyncio.to_thread(self.store.holding, model)).tensors
        for ref in request.chunks:
            loc = whole.get(ref.tensor) or (p.location if (p := partial.get(ref.tensor)) else None)
            if loc is None:
                if self.coming(model, None):
                    continue  # its plan is not written yet: answered missing, coming
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"{model!r} has no tensor {ref.tensor[:120]!r} here",
                )
                raise AssertionError("abort raises")
            if ref.length > MAX_CHUNK_BYTES or ref.offset + ref.length > loc.info.nbytes:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"bytes [{ref.offset}, {ref.offset + ref.length}) of {ref.tensor!r}: the "
                    f"tensor has {loc.info.nbytes} bytes and a chunk at most {MAX_CHUNK_BYTES}",
                )
        fds: dict[Path, int] = {}

        def pread(loc: TensorLocation, ref: transfer_pb2.ChunkRef) -> bytes:
            if loc.path not in fds:
                fds[loc.path] = os.open(loc.path, os.O_RDONLY)
            return os.pread(fds[loc.path], ref.length, loc.start + ref.offset)

        def read(ref: transfer_pb2.ChunkRef) -> tuple[bytes, bytes] | None:
            """The chunk and its digest; None when it is not here (yet)."""
            if ref.tensor in whole:
                data = pread(whole[ref.tensor], ref)
                return data, blake3(data).digest()
            p = partial.get(ref.tensor)
            recorded = p.chunk(ref.offset, ref.length) if p is not None else None
            if p is None or recorded is None:
                return None
            try:
                data = pread(p.location, ref)
            except FileNotFoundError:
                return None  # renamed complete since listed: the asker asks again
            digest = blake3(data).digest()
            # The log is written after the chunk: a crash between the two leaves a
            # recorded chunk whose bytes are not on disk.
            return (data, digest) if digest.hex() == recorded else None

        refs = list(request.chunks)
        # One chunk is read and hashed (in a thread) while the previous one is sent.
        ahead = asyncio.ensure_future(asyncio.to_thread(read, refs[0])) if refs else None
        try:
            for i, ref in enumerate(refs):
                assert ahead is not None
                got = await ahead
                ahead = (
                    asyncio.ensure_future(asyncio.to_thread(read, refs[i + 1]))
                    if i + 1 < len(refs)
                    else None
                )
                if got is None:
                    p = partial.get(ref.tensor)
                    coming = self.coming(model, p.folder if p is not None else None) or (
                        p is not None and not p.folder.exists()
                    )
                    yield transfer_pb2.Chunk(ref=ref, missing=True, coming=coming)
                    continue
                data, digest = got
                if len(data) != ref.length:
                    await context.abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"the file of {ref.tensor!r} is shorter than its header says",
                    )
                self.bytes_sent_total += len(data)
                self.bytes_sent[ref.tensor] = self.bytes_sent.get(ref.tensor, 0) + len(data)
                log.debug(
                    "sent bytes [%d, %d) of %s of %s",
                    ref.offset,
                    ref.offset + len(data),
                    ref.tensor,
                    model,
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
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "this server only serves the models it holds: only a worker fetches stages",
        )
        yield transfer_pb2.TransferProgress()  # unreachable: abort raises


def held_models(held: list[Holding]) -> list[transfer_pb2.HeldModel]:
    """What ``ListModels`` says of each holding."""
    return [
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
    ]


def model_info(model: str, path: Path) -> worker_pb2.ModelInfo:
    """The profile the planner needs of the model folder at ``path`` (InspectModel's reply).

    Raises OSError or ValueError when the folder cannot be read.
    """
    profile = ModelProfile.from_model_dir(path)
    return worker_pb2.ModelInfo(
        model=model,
        path=str(path),
        model_type=profile.model_type,
        num_layers=profile.num_layers,
        layer_bytes=list(profile.layer_weight_bytes),
        other_bytes=profile.embedding_bytes + profile.head_bytes,
        max_context=profile.max_context or 0,
        vocab_size=profile.vocab_size,
        profile_json=profile.to_json(),
    )
