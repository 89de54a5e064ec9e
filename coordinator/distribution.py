"""Model distribution, the coordinator's side: who holds the model, who needs which stage.

Before a load, the coordinator asks every worker what it holds (``ListModels``),
reads the model's profile from a worker that holds it whole (or from its own
``--model-dir`` when none does), prefers holders when the planner's choice is
among interchangeable machines, refuses a plan whose transfers do not fit a
worker's disk, and then has every worker that lacks its stage fetch it
(``Stage``) from the holders, the coordinator among them, watching progress.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import grpc

from pomona import rpc
from pomona.coordinator import events as ev
from pomona.coordinator.links import Links, Measurement
from pomona.coordinator.monitor import Monitor
from pomona.coordinator.placement import Assignment, PlacementError
from pomona.coordinator.planner import Plan
from pomona.model_source import held_models, model_info
from pomona.model_store import ModelStore
from pomona.models import DEFAULT_MODEL, ModelNotFound, ModelRefused, resolve_model
from pomona.safetensors_layout import LayoutError
from pomona.units import format_bytes
from pomona.v1 import coordinator_pb2, transfer_pb2, transfer_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)

LIST_TIMEOUT = 10.0


Survey = dict[str, transfer_pb2.ListModelsReply]  # by node id
# The coordinator's entry in a survey: "" is what calls to it are signed for.
COORDINATOR = ""
COORDINATOR_NAME = "coordinator"


class Member(Protocol):
    node_id: str
    name: str
    address: str
    describe: worker_pb2.DescribeReply

    @property
    def host(self) -> str: ...


@dataclass(frozen=True)
class StageNeed:
    start: int
    end: int
    first: bool
    last: bool

    @classmethod
    def of(cls, a: Assignment, rank: int, world_size: int) -> StageNeed:
        return cls(a.start, a.end, rank == 0 or a.whole, rank == world_size - 1 or a.whole)


def held_model(
    reply: transfer_pb2.ListModelsReply | None, model: str
) -> transfer_pb2.HeldModel | None:
    if reply is None:
        return None
    return next((m for m in reply.models if m.model == model), None)


def holds_stage(held: transfer_pb2.HeldModel | None, need: StageNeed) -> bool:
    """Whether ``held`` has every tensor of stage ``need`` (the whole model, or a stage folder)."""
    if held is None:
        return False
    if held.complete:
        return True
    return any(
        s.start_layer <= need.start
        and need.end <= s.end_layer
        and (s.first or not need.first)
        and (s.last or not need.last)
        for s in held.stages
    )


def _kind(d: worker_pb2.DescribeReply) -> tuple[object, ...]:
    """What makes two machines interchangeable to the planner (memory in use aside).

    The chip and the memory. Bandwidth follows from the chip where Apple's table
    knows it; elsewhere each worker measures it, and one machine measures values
    apart by more than a third from run to run on a busy CPU: same chip, same kind.
    """
    hw = d.hardware
    return (hw.chip, hw.total_memory_bytes, hw.gpu_memory_limit_bytes, hw.gpu_cores, hw.rdma)


def prefer_holders(
    assignments: Sequence[Assignment],
    nodes: Sequence[worker_pb2.DescribeReply],
    survey: dict[str, transfer_pb2.ListModelsReply],
    model: str,
) -> list[Assignment]:
    """The plan with interchangeable machines swapped so that holders keep what they hold.

    A tie-breaker only: a stage moves only to a machine of the same kind as the
    one the planner chose (same chip and memory), so memory fit is unchanged.
    Stages are settled largest first.
    """
    kinds = {d.node_id: _kind(d) for d in nodes}
    names = {d.node_id: d.name for d in nodes}
    world = len(assignments)
    free = {d.node_id for d in nodes}
    order = sorted(range(world), key=lambda i: -assignments[i].weights_bytes)
    planned = {a.node_id: i for i, a in enumerate(assignments)}
    chosen: dict[int, str] = {}
    # A stage folder is of use for its own stage only: those stay first. A
    # whole model is of use anywhere: its holder goes to the largest stage.
    for i in order:
        a = assignments[i]
        held = held_model(survey.get(a.node_id), model)
        if held is not None and not held.complete and holds_stage(held, StageNeed.of(a, i, world)):
            chosen[i] = a.node_id
            free.discard(a.node_id)
    for i in order:
        if i in chosen:
            continue
        a = assignments[i]
        need = StageNeed.of(a, i, world)
        same = [n for n in sorted(free) if kinds.get(n) == kinds.get(a.node_id)]
        holder = next(
            (n for n in same if holds_stage(held_model(survey.get(n), model), need)), None
        )
        pick = holder or min(same, key=lambda n: _moves(n, a.node_id, planned, chosen))
        chosen[i] = pick
        free.discard(pick)
    return [
        replace(a, node_id=chosen[i], name=names.get(chosen[i], a.name))
        for i, a in enumerate(assignments)
    ]


def _moves(node: str, own: str, planned: dict[str, int], chosen: dict[int, str]) -> int:
    """How much taking ``node`` for a stage planned on ``own`` disturbs the plan."""
    if node == own:
        return 0
    if node in planned and planned[node] in chosen:
        return 1  # its own stage went to a holder: it is free to move
    return 2 if node not in planned else 3


def check_disk(
    assignments: Sequence[Assignment],
    survey: dict[str, transfer_pb2.ListModelsReply],
    model: str,
) -> None:
    """PlacementError when a worker would fetch more than its model cache has room for."""
    world = len(assignments)
    # A tensor rank (Assignment.whole) fetches every tensor: the whole model.
    whole = max(
        (h.bytes for r in survey.values() if (h := held_model(r, model)) and h.complete),
        default=0,
    )
    problems = []
    for i, a in enumerate(assignments):
        reply = survey.get(a.node_id)
        if reply is None or holds_stage(held_model(reply, model), StageNeed.of(a, i, world)):
            continue
        room = reply.cache_free_bytes
        if reply.cache_max_bytes:
            room = min(room, reply.cache_max_bytes)
        size = whole if a.whole and whole else a.weights_bytes
        what = "every tensor" if a.whole else f"layers [{a.start}, {a.end})"
        if size > room:
            problems.append(
                f"{a.name} would fetch {what} of {model}: "
                f"{format_bytes(size)}, but its model cache ({reply.cache_dir}) has "
                f"{format_bytes(room)} free, {format_bytes(size - room)} short"
            )
    if problems:
        raise PlacementError("; ".join(problems))


def relabel(plan: Plan | None, assignments: Sequence[Assignment]) -> Plan | None:
    """The plan with each stage on the node ``prefer_holders`` gave it."""
    if plan is None or len(plan.stages) != len(assignments):
        return plan
    stages = tuple(
        replace(s, node_id=a.node_id, name=a.name)
        for s, a in zip(plan.stages, assignments, strict=True)
    )
    return replace(plan, stages=stages)


class LocalModels:
    """The models in the coordinator's own ``--model-dir``s, served to workers.

    The coordinator holds no layers: it is a holder in the survey (under
    ``COORDINATOR``), a source of ``Stage`` calls, and where the model's profile
    is read when no worker holds the model whole.
    """

    def __init__(self, model_dirs: tuple[Path, ...], host: str, port: int) -> None:
        self.host, self.port = host, port
        self.store = ModelStore(self._resolve, model_dirs, None)

    def _resolve(self, name: str) -> Path:
        if name == DEFAULT_MODEL:
            # Every worker makes the demo model itself.
            raise ModelNotFound("the coordinator does not serve the demo model")
        return resolve_model(name, self.store.model_dirs)

    def reply(self, model: str) -> transfer_pb2.ListModelsReply:
        return transfer_pb2.ListModelsReply(models=held_models(self.store.held(model)))

    def profile(self, model: str) -> worker_pb2.ModelInfo | None:
        """The model's profile from the folder here; None when it is not here or unreadable."""
        try:
            return model_info(model, self._resolve(model))
        except (ModelNotFound, ModelRefused, OSError, ValueError, LayoutError) as e:
            log.warning("cannot read %s from the coordinator's model folders: %s", model, e)
            return None

    def address_for(self, worker: str) -> str:
        """The coordinator's address as the worker at ``worker`` ("host:port") reaches it."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = _route_to(worker.rsplit(":", 1)[0].strip("[]"))
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _route_to(host: str) -> str:
    """This machine's address on the route to ``host`` (no packet is sent)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return str(s.getsockname()[0]).split("%", 1)[0]
    except (OSError, IndexError):
        return socket.gethostname()


def _addresses(holder: Member, best: Measurement | None) -> list[tuple[str, str]]:
    """Where a receiver reaches ``holder``'s transfers: on ``best``, the fastest link
    measured between them, then at the address it was found at (a daemon that listens
    on one address only refuses the other; the fetch then moves on)."""
    found = (holder.address, holder.node_id)
    if best is None or best.candidate.address == holder.host:
        return [found]
    port = holder.address.rsplit(":", 1)[1]
    return [(f"{best.candidate.address}:{port}", holder.node_id), found]


class TransferFailed(PlacementError):
    pass


async def all_staged(jobs: dict[str, asyncio.Task[None]]) -> None:
    """Once every fetch of ``jobs`` (``Distributor.stage_jobs``) has ended; TransferFailed
    naming every one that failed."""
    results = await asyncio.gather(*jobs.values(), return_exceptions=True)
    errors = [str(r) for r in results if isinstance(r, BaseException)]
    if errors:
        raise TransferFailed("; ".join(errors))


class Distributor:
    def __init__(self, monitor: Monitor, channel: Callable[[str, str], grpc.aio.Channel]) -> None:
        self.monitor = monitor
        self._channel = channel
        # The last progress of every worker's transfer, by node id (for status).
        self.transfers: dict[str, transfer_pb2.TransferProgress] = {}
        self.names: dict[str, str] = {}
        self._on_progress: Callable[[str], None] = lambda line: None
        # The coordinator's own model folders, when it serves them (--model-dir).
        self.local: LocalModels | None = None
        # The last survey taken: whether any worker holds the model whole.
        self.last_survey: Survey = {}
        # Measured links between workers (coordinator/links.py), when there are any.
        self.links: Links | None = None

    def _stub(self, m: Member) -> transfer_pb2_grpc.ModelTransferStub:
        return transfer_pb2_grpc.ModelTransferStub(self._channel(m.address, m.node_id))

    async def take_survey(
        self, members: Sequence[Member], model: str = ""
    ) -> dict[str, transfer_pb2.ListModelsReply]:
        """What each worker holds; a worker that cannot say holds nothing."""

        async def one(m: Member) -> transfer_pb2.ListModelsReply | None:
            try:
                return await self._stub(m).ListModels(
                    transfer_pb2.ListModelsRequest(model=model), timeout=LIST_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "%s cannot list its models: %s", m.name, rpc.describe_error(e, m.address)
                )
                return None

        async def own() -> transfer_pb2.ListModelsReply | None:
            if self.local is None:
                return None
            try:
                return await asyncio.to_thread(self.local.reply, model)
            except (OSError, ValueError) as e:
                log.warning("cannot list the coordinator's own models: %s", e)
                return None

        replies = await asyncio.gather(own(), *(one(m) for m in members))
        survey = {m.node_id: r for m, r in zip(members, replies[1:], strict=True) if r is not None}
        if replies[0] is not None:
            survey[COORDINATOR] = replies[0]
        self.last_survey = survey
        return survey

    async def local_profile(self, model: str) -> worker_pb2.ModelInfo | None:
        """The profile read here, when the last survey found no worker holding ``model`` whole."""
        if self.local is None:
            return None
        survey = self.last_survey
        own = held_model(survey.get(COORDINATOR), model)
        if own is None or not own.complete:
            return None
        if any(
            (h := held_model(r, model)) is not None and h.complete
            for n, r in survey.items()
            if n != COORDINATOR
        ):
            return None
        return await asyncio.to_thread(self.local.profile, model)

    def holders_first(self, members: Sequence[Member], model: str, survey: Survey) -> list[Member]:
        """``members``, those holding ``model`` whole first (they can profile it)."""

        def whole(m: Member) -> bool:
            held = held_model(survey.get(m.node_id), model)
            return held is not None and held.complete

        return sorted(members, key=lambda m: not whole(m))

    def sources(
        self, members: Sequence[Member], model: str, receiver: Member, survey: Survey
    ) -> list[tuple[str, str]]:
        """Addresses and node ids of the holders of ``model``: workers holding it whole,
        then the coordinator, then workers with stage folders."""
        links = self.links
        held = [
            (m, h, links.best(receiver.node_id, m.node_id) if links else None)
            for m in members
            if m.node_id != receiver.node_id and (h := held_model(survey.get(m.node_id), model))
        ]
        # The fastest measured link first (Thunderbolt over Ethernet over Wi-Fi).
        held.sort(key=lambda mhb: -(mhb[2].bandwidth_bytes_per_s if mhb[2] else 0.0))
        whole = [a for m, h, best in held if h.complete for a in _addresses(m, best)]
        folders = [a for m, h, best in held if not h.complete for a in _addresses(m, best)]
        own = held_model(survey.get(COORDINATOR), model)
        if self.local is not None and own is not None and own.complete:
            whole.append((self.local.address_for(receiver.address), COORDINATOR))
        return whole + folders

    def node_transfers(self) -> list[coordinator_pb2.NodeTransfer]:
        return [
            coordinator_pb2.NodeTransfer(node_id=n, name=self.names.get(n, n), progress=p)
            for n, p in sorted(self.transfers.items(), key=lambda kv: self.names.get(kv[0], kv[0]))
        ]

    def progress_line(self) -> str:
        """`fetching stages: mini-2 120 MB of 400 MB, 95 MB/s, 3 s left; ...`."""
        parts = []
        for n, p in sorted(self.transfers.items(), key=lambda kv: self.names.get(kv[0], kv[0])):
            if p.state != "fetching":
                continue
            eta = f", {p.eta_s:.0f} s left" if p.HasField("eta_s") else ""
            parts.append(
                f"{self.names.get(n, n)} {format_bytes(p.bytes_done)} of "
                f"{format_bytes(p.bytes_total)}, {format_bytes(int(p.bytes_per_s))}/s{eta}"
            )
        return "fetching stages: " + ("; ".join(parts) or "starting")

    async def stage_all(
        self,
        model: str,
        members: Sequence[Member],
        assignments: Sequence[Assignment],
        survey: Survey,
        timeout: float,
        on_progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        """Every worker of the plan holds its stage, or TransferFailed says who does not."""
        await all_staged(self.stage_jobs(model, members, assignments, survey, timeout, on_progress))

    def stage_jobs(
        self,
        model: str,
        members: Sequence[Member],
        assignments: Sequence[Assignment],
        survey: Survey,
        timeout: float,
        on_progress: Callable[[str], None] = lambda line: None,
    ) -> dict[str, asyncio.Task[None]]:
        """A running fetch for every worker of the plan that lacks its stage, by node id.

        Each task ends once its worker holds its stage (TransferFailed if it cannot),
        so that worker's load can start while the others still fetch.
        """
        by_id = {m.node_id: m for m in members}
        self.names.update({m.node_id: m.name for m in members})
        self.transfers.clear()
        self._on_progress = on_progress
        world = len(assignments)
        jobs = {}
        # Workers fetching now, in rank order: each is a peer of those after it, which
        # take the tensors they share with it (a tied embedding) from it, not the sources.
        receivers: list[tuple[str, str, transfer_pb2.LayerRange]] = []
        for rank, a in enumerate(assignments):
            if a.node_id not in survey:
                continue  # it cannot say what it holds: it loads from its own model dirs
            held = held_model(survey[a.node_id], model)
            need = StageNeed.of(a, rank, world)
            if held is not None and held.complete:
                continue
            member = by_id[a.node_id]
            sources = self.sources(members, model, member, survey)
            # A tensor rank fetches every tensor, as the only stage of a pipeline would.
            at, of = (0, 1) if a.whole else (rank, world)
            job = self._stage_one(model, member, sources, list(receivers), a, at, of, timeout)
            jobs[a.node_id] = asyncio.ensure_future(job)
            stage = transfer_pb2.LayerRange(
                start_layer=a.start, end_layer=a.end, first=need.first, last=need.last
            )
            receivers.append((member.address, member.node_id, stage))
        return jobs

    @staticmethod
    def deadline(timeout: float, a: Assignment) -> float:
        """Seconds a stage's fetch may take: a large stage on a slow link may take longer
        than a load (at least 10 MB/s)."""
        return max(timeout, 60.0 + a.weights_bytes / 10e6)

    async def _stage_one(
        self,
        model: str,
        member: Member,
        sources: list[tuple[str, str]],
        peers: list[tuple[str, str, transfer_pb2.LayerRange]],
        a: Assignment,
        rank: int,
        world: int,
        timeout: float,
    ) -> None:
        request = transfer_pb2.StageRequest(
            model=model,
            start_layer=a.start,
            end_layer=a.end,
            rank=rank,
            world_size=world,
            sources=[address for address, _ in sources],
            source_node_ids=[node_id for _, node_id in sources],
            peers=[address for address, _, _ in peers],
            peer_node_ids=[node_id for _, node_id, _ in peers],
            peer_stages=[stage for _, _, stage in peers],
        )
        what = f"layers [{a.start}, {a.end}) of {model}"
        started = time.monotonic()
        announced = False
        last = None
        try:
            deadline = self.deadline(timeout, a)
            async for progress in self._stub(member).Stage(request, timeout=deadline):
                last = progress
                self.transfers[member.node_id] = progress
                self._on_progress(self.progress_line())
                if progress.state == "fetching" and not announced:
                    announced = True
                    self.monitor.events.record(
                        ev.TRANSFER_STARTED,
                        member.node_id,
                        member.name,
                        f"{what}: {format_bytes(progress.bytes_total)} from {progress.source}",
                    )
        except grpc.aio.AioRpcError as e:
            why = f"{member.name} cannot fetch {what}: {rpc.describe_error(e, member.address)}"
            self.monitor.events.record(ev.TRANSFER_FAILED, member.node_id, member.name, why)
            raise TransferFailed(why) from e
        if last is not None and last.state == "done":
            seconds = time.monotonic() - started
            self.monitor.events.record(
                ev.TRANSFER_FINISHED,
                member.node_id,
                member.name,
                f"{what}: {format_bytes(last.bytes_received)} received in {seconds:.1f} s "
                f"({format_bytes(int(last.bytes_received / max(seconds, 1e-3)))}/s)"
                + (
                    f", {format_bytes(last.bytes_from_peers)} of it from peers"
                    if last.bytes_from_peers
                    else ""
                ),
            )


def cluster_models(
    survey: dict[str, transfer_pb2.ListModelsReply], names: dict[str, str]
) -> coordinator_pb2.ClusterModels:
    """Every model some worker holds, with who holds it and how much."""
    models: dict[str, coordinator_pb2.ClusterModel] = {}
    names = {COORDINATOR: COORDINATOR_NAME, **names}
    for node_id, reply in sorted(survey.items(), key=lambda kv: names.get(kv[0], kv[0])):
        for held in reply.models:
            entry = models.setdefault(held.model, coordinator_pb2.ClusterModel(model=held.model))
            if held.complete:
                entry.size_bytes = max(entry.size_bytes, held.bytes)
            entry.holders.append(
                coordinator_pb2.ModelHolder(
                    node_id=node_id,
                    name=names.get(node_id, node_id),
                    complete=held.complete,
                    bytes=held.bytes,
                    stages=held.stages,
                )
            )
    return coordinator_pb2.ClusterModels(models=[models[k] for k in sorted(models)])
