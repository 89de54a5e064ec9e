"""The ModelTransfer service of a worker daemon: serve what it holds, fetch what it lacks.

Thin: the serving half is ``pomona.model_source`` (shared with the coordinator);
fetching is ``transfer_fetch``; errors leave as status codes with one line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from pomona.model_source import ModelSource
from pomona.model_store import Holding, ModelStore
from pomona.models import ModelNotFound, check_model_name
from pomona.safetensors_layout import LayoutError
from pomona.security import Auth
from pomona.stage_cache import PARTIAL, StageCache, StageKey
from pomona.v1 import transfer_pb2
from pomona.worker.transfer_fetch import Progress, TransferError, fetch_stage

log = logging.getLogger(__name__)

MAX_SOURCES = 64

K = TypeVar("K")


class TransferService(ModelSource):
    """A worker's ModelTransfer: serves what it holds, fetches the stages it lacks."""

    def __init__(
        self,
        store: ModelStore,
        auth: Auth | None,
        in_use: Callable[[], list[Path]] = list,
        on_survey: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(store, on_survey)
        if store.cache is None:
            raise ValueError("a worker's model store needs its model cache")
        self.cache: StageCache = store.cache
        self.auth = auth
        self.in_use = in_use
        # The transfer under way (or last finished) per stage folder, for status.
        self.transfers: dict[str, Progress] = {}
        self.bytes_received_total = 0
        self._locks: dict[Path, asyncio.Lock] = {}
        # The .partial folders being fetched now, and fetches under way per model:
        # what peers asking for a chunk not verified yet are told to wait for.
        self._fetching: dict[Path, int] = {}
        self._fetching_models: dict[str, int] = {}

    def coming(self, model: str, folder: Path | None) -> bool:
        if folder is None:
            return self._fetching_models.get(model, 0) > 0
        return self._fetching.get(folder, 0) > 0

    async def Stage(self, request, context) -> AsyncIterator[transfer_pb2.TransferProgress]:  # noqa: N802
        problem = _check_stage(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        key = StageKey.of(request.start_layer, request.end_layer, request.rank, request.world_size)
        folder = self.cache.folder(request.model, key)
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
        peers = [
            (address, node_id, StageKey(s.start_layer, s.end_layer, s.first, s.last))
            for address, node_id, s in zip(
                request.peers, request.peer_node_ids, request.peer_stages, strict=True
            )
        ]
        folder = self.cache.folder(request.model, key)
        partial = folder.with_name(folder.name + PARTIAL)
        self._fetching[partial] = self._fetching.get(partial, 0) + 1
        self._fetching_models[request.model] = self._fetching_models.get(request.model, 0) + 1
        try:
            path, progress = await fetch_stage(
                request.model,
                key,
                list(request.sources),
                self.cache,
                self.auth,
                on_progress=on_progress,
                keep=self.in_use(),
                targets=dict(zip(request.sources, request.source_node_ids, strict=False)),
                peers=peers,
            )
        finally:
            _drop(self._fetching, partial)
            _drop(self._fetching_models, request.model)
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
    if len(r.peers) > MAX_SOURCES:
        return f"{len(r.peers)} peers: at most {MAX_SOURCES}"
    if not len(r.peers) == len(r.peer_node_ids) == len(r.peer_stages):
        return "peer_node_ids and peer_stages must name every peer, in order"
    for s in r.peer_stages:
        if not 0 <= s.start_layer < s.end_layer <= 100_000:
            return f"a peer's layer range [{s.start_layer}, {s.end_layer}) is empty or negative"
    return ""


def _drop(counts: dict[K, int], key: K) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
