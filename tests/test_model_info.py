"""The coordinator's Status learns the serving model from a stage once per load."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc

from pomona.coordinator.model_info import ModelInfoCache
from pomona.v1 import worker_pb2


class _Failed(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
        )


@dataclass
class FakeStub:
    vocab: int
    fail: bool = False
    calls: int = 0

    async def InspectModel(self, request: Any, timeout: float) -> worker_pb2.ModelInfo:  # noqa: N802
        self.calls += 1
        if self.fail:
            raise _Failed()
        return worker_pb2.ModelInfo(model=request.model, vocab_size=self.vocab)


@dataclass
class FakeCluster:
    stubs: dict[str, FakeStub]
    serving: Any = None
    config: Any = field(default_factory=lambda: SimpleNamespace(model="m"))

    @property
    def members(self) -> dict[str, Any]:
        return {k: SimpleNamespace(stub=s, name=k) for k, s in self.stubs.items()}

    def serve(self, load_id: str, *nodes: str) -> None:
        stages = tuple(SimpleNamespace(node_id=n) for n in nodes)
        self.serving = SimpleNamespace(load_id=load_id, assignments=stages)


def test_asked_once_per_load_from_the_first_stage_that_answers() -> None:
    async def scenario() -> None:
        a, b = FakeStub(100, fail=True), FakeStub(200)
        cluster = FakeCluster({"a": a, "b": b})
        cache = ModelInfoCache(cluster)  # type: ignore[arg-type]
        assert await cache.get() is None  # not serving
        cluster.serve("load-1", "a", "b")
        first = await cache.get()
        assert first is not None and first.vocab_size == 200
        assert (await cache.get()) is first and b.calls == 1
        cluster.serve("load-2", "a")  # a new load on a stage that cannot answer
        assert await cache.get() is None and cache.current() is None
        a.fail = False
        info = await cache.get()  # asked again, not stuck on the failure
        assert info is not None and info.vocab_size == 100 and a.calls == 3

    asyncio.run(scenario())
