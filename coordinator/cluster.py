"""Membership, planning, loading and re-forming: the coordinator's view of the cluster.

Workers found by Bonjour or given as seeds are described and kept by node
id (a worker that comes back at a new address keeps its id). Once enough are
known and membership has been quiet for a moment, the planner places the
model's layers, every worker loads its range, and the head runner's address
becomes the entry point for requests. When a node or a runner of the
pipeline fails, the group is torn down and the model placed again on the
nodes that remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from pomona import rpc
from pomona.config import CoordinatorConfig
from pomona.coordinator import events as ev
from pomona.coordinator.backend_choice import BackendChoice, choose_backend, facts_of, rdma_rows
from pomona.coordinator.distribution import (
    Distributor,
    TransferFailed,
    all_staged,
    check_disk,
    prefer_holders,
    relabel,
)
from pomona.coordinator.links import Links
from pomona.coordinator.monitor import Monitor
from pomona.coordinator.parallel import ParallelChoice, is_tensor_layout
from pomona.coordinator.placement import Assignment, PlacementError, choose_split, place
from pomona.coordinator.planner import Plan
from pomona.coordinator.prompt_cache_plan import (
    PromptCacheBudget,
    PromptCacheError,
    prompt_cache_budget,
)
from pomona.model_profile import ModelProfile
from pomona.tokens import check_describe_proof, is_target, new_challenge
from pomona.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# Seconds after a load starts serving before links nothing depended on are measured.
LINKS_AFTER_SERVING_S = 10.0

RETRY_PLAN_S = 2.0
RETRY_TRANSFER_S = 10.0
# A failed load is tried again after this, doubling up to RETRY_MAX_S; a
# node whose load failed LEAVE_OUT_AFTER times in a row is left out of the
# plan for LEAVE_OUT_S (or until it comes back after being lost).
RETRY_MAX_S = 30.0
LEAVE_OUT_AFTER = 2
LEAVE_OUT_S = 300.0


class GroupFailed(RuntimeError):
    """A runner loaded but its MLX group did not form: the backend is at fault."""


@dataclass
class Member:
    node_id: str
    name: str
    address: str
    describe: worker_pb2.DescribeReply
    stub: worker_pb2_grpc.WorkerStub
    state: str = "discovered"  # discovered, loading, serving, idle, lost

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass(frozen=True)
class Serving:
    load_id: str
    head_address: str
    assignments: tuple[Assignment, ...]
    max_context: int
    # What each runner reported once ready, by node id.
    shards: dict[str, worker_pb2.ShardStatus] = field(default_factory=dict)

    def holds(self, node_id: str) -> bool:
        return any(a.node_id == node_id for a in self.assignments)


class Cluster:
    def __init__(self, config: CoordinatorConfig, monitor: Monitor | None = None):
        self.config = config
        self.monitor = monitor or Monitor()
        self.members: dict[str, Member] = {}
        self.serving: Serving | None = None
        self.problem = "waiting for workers"
        self.plan: Plan | None = None
        self.parallel: ParallelChoice | None = None  # pipeline or tensor, and why
        self.loading = False
        # Why the pipeline last broke, for the requests it cut off; while it
        # re-forms, new requests wait for it instead of failing.
        self.failure = ""
        self.reforming = False
        self.ever_served = False
        # When the first plan began to wait for the missing ranks of a running load.
        self._adopt_wait_began: float | None = None
        self._changed = asyncio.Event()
        self._last_change = time.monotonic()
        self._serving_changed = asyncio.Condition()
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Who this coordinator is to the workers' leases.
        self.coordinator_id = f"{socket.gethostname()}:{config.port}/{uuid.uuid4().hex[:8]}"
        # Loads that broke: never adopted again, whatever a worker still says.
        self._dead_loads: set[str] = set()
        # Consecutive failed loads per node, and the nodes left out for now.
        self._load_failures: dict[str, int] = {}
        self.left_out: dict[str, tuple[float, str]] = {}
        self._retries = 0
        # Node sets (with what they reported) whose group did not form over the chosen
        # backend: the ring, and why. A worker restarted with new facts tries again.
        self._backend_failed: dict[frozenset[tuple[str, bytes]], str] = {}
        # The served model's profile: it does not change while we serve it, and
        # re-forming after a failure should not wait to read it again.
        self._model_info: worker_pb2.ModelInfo | None = None
        self.distribution = Distributor(self.monitor, self.channel)
        self.links = Links()
        self.distribution.links = self.links
        self._tasks: set[asyncio.Task[None]] = set()

    # -- membership -------------------------------------------------------------

    async def add_address(self, address: str, props: dict[str, str] | None = None) -> Member | None:
        """Describe the worker at ``address`` and keep it if it belongs here."""
        challenge = new_challenge()
        stub = worker_pb2_grpc.WorkerStub(self.channel(address))
        try:
            reply = await stub.Describe(
                worker_pb2.DescribeRequest(challenge=challenge), timeout=rpc.DESCRIBE_TIMEOUT
            )
        except grpc.aio.AioRpcError as e:
            log.warning("cannot describe worker at %s: %s", address, rpc.describe_error(e, address))
            return None
        if reply.cluster != self.config.cluster:
            log.info("ignoring %s at %s: cluster %r", reply.name, address, reply.cluster)
            return None
        if not self._proven(reply, challenge):
            log.warning("ignoring %s at %s: no proof of the cluster secret", reply.name, address)
            return None
        known = self.members.get(reply.node_id)
        if known is not None and known.address == address:
            known.describe = reply
            return known
        stub = worker_pb2_grpc.WorkerStub(self.channel(address, reply.node_id))
        member = Member(reply.node_id, reply.name, address, reply, stub)
        if known is not None:
            log.info("worker %s (%s) is now at %s", reply.name, reply.node_id, address)
            member.state = known.state
            self.members[reply.node_id] = member
            await self.close_unused_channels()
        else:
            log.info("worker %s (node %s) joined at %s", reply.name, reply.node_id, address)
        self.members[reply.node_id] = member
        self.monitor.add_node(reply.node_id, reply.name, address)
        self.note_change()
        return member

    def needed(self) -> int:
        """Workers to wait for before planning.

        ``min_workers`` holds back the first plan only, less the nodes left
        out for failing to load: after a failure the model is placed on
        whatever remains, if it fits.
        """
        if self.ever_served:
            return 1
        return max(1, self.config.min_workers - len(self.left_out))

    def all_expected(self, usable: list[Member]) -> bool:
        """Every worker the first plan was told to wait for (``--min-workers`` > 1) is in.

        Then the first plan starts at once: the settle only gathers answers that
        may still come when it is not known how many to expect.
        """
        expected = self.config.min_workers
        return not self.ever_served and expected > 1 and len(usable) >= expected

    def missing_ranks(self, usable: list[Member]) -> str:
        """Why the first plan waits for more workers ("" when it need not).

        Workers found so far may hold some ranks of a load of this model that
        is still running (this coordinator was restarted): until the others
        are found, or ``adopt_wait_seconds`` pass, planning would reload the
        model (minutes for a big one) instead of adopting the load. Bonjour
        answers can come seconds apart on a busy network or machine, more
        than the settle. The loop is woken when the wait runs out.
        """
        if self.ever_served or self.serving is not None:
            return ""
        ranks: dict[str, tuple[int, set[int]]] = {}
        for m in usable:
            s = m.describe.shard
            if (
                s.state != worker_pb2.SHARD_STATE_READY
                or s.model != self.config.model
                or s.world_size < 2
                or s.load_id in self._dead_loads
            ):
                continue
            ranks.setdefault(s.load_id, (s.world_size, set()))[1].add(s.rank)
        short = [(load, size, found) for load, (size, found) in ranks.items() if len(found) < size]
        if not short:
            self._adopt_wait_began = None
            return ""
        now = time.monotonic()
        if self._adopt_wait_began is None:
            self._adopt_wait_began = now
            asyncio.get_running_loop().call_later(self.config.adopt_wait_seconds, self.note_change)
        if now - self._adopt_wait_began >= self.config.adopt_wait_seconds:
            return ""
        load, size, found = short[0]
        return (
            f"waiting for the workers of the running load {load}: {len(found)} of its "
            f"{size} ranks found, up to {self.config.adopt_wait_seconds:.0f} s, to adopt it"
        )

    def usable(self) -> list[Member]:
        now = time.monotonic()
        for node_id, (until, _) in list(self.left_out.items()):
            if now >= until:
                del self.left_out[node_id]
                self._load_failures.pop(node_id, None)
        return sorted(
            (
                m
                for m in self.members.values()
                if m.state != "lost" and m.node_id not in self.left_out
            ),
            key=lambda m: m.node_id,
        )

    def returned(self, member: Member) -> None:
        """A lost member answers again: it is taken back in at the next plan."""
        if member.state == "lost":
            log.info("worker %s (%s) is back", member.name, member.node_id)
            member.state = "idle"
            # A restarted node gets a fresh chance to load.
            self.left_out.pop(member.node_id, None)
            self._load_failures.pop(member.node_id, None)
            self.note_change()

    def _proven(self, reply: worker_pb2.DescribeReply, challenge: bytes) -> bool:
        """Whether the worker answered our challenge with the secret (or none is in use)."""
        secrets = self.config.auth.secrets if self.config.auth else None
        if secrets is None:
            return True
        if not reply.node_id or not is_target(reply.node_id):
            return False  # no channel could sign calls for it
        body = worker_pb2.DescribeReply()
        body.CopyFrom(reply)
        body.ClearField("proof")
        data = body.SerializeToString(deterministic=True)
        return check_describe_proof(secrets, challenge, reply.node_id, data, reply.proof)

    def channel(self, address: str, target: str = "") -> grpc.aio.Channel:
        """A channel to the server at ``address`` named ``target`` (a node id) in tokens."""
        key = f"{address}|{target}"
        if key not in self._channels:
            self._channels[key] = rpc.aio_channel(address, self.config.auth, target)
        return self._channels[key]

    async def close_unused_channels(self) -> None:
        """Close channels to addresses no member or pipeline uses any more."""
        used = {m.address for m in self.members.values()}
        if self.serving is not None:
            used.add(self.serving.head_address)
        for key in [k for k in self._channels if k.split("|", 1)[0] not in used]:
            await self._channels.pop(key).close()

    def note_change(self) -> None:
        self._last_change = time.monotonic()
        self._changed.set()

    # -- planning and loading -------------------------------------------------------

    async def run(self) -> None:
        """Plan and load whenever the cluster is not serving and membership allows."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self.serving is not None:
                for m in self.members.values():
                    if m.state == "discovered":
                        m.state = "idle"
                continue
            usable = self.usable()
            needed = self.needed()
            if len(usable) < needed:
                self.reforming = False
                self.problem = f"waiting for workers: {len(usable)} of {needed} available" + (
                    f" ({self.failure})" if self.failure else ""
                )
                continue
            missing = self.missing_ranks(usable)
            if missing:
                self.problem = missing
                continue
            quiet = self.config.settle_seconds - (time.monotonic() - self._last_change)
            if quiet > 0 and not self.all_expected(usable):
                await asyncio.sleep(quiet)
                if self._changed.is_set():
                    continue
            await self.plan_and_load()

    async def plan_and_load(self) -> None:
        members = await self._refresh(self.usable())
        if not members:
            return
        self.loading = True
        try:
            survey = await self.distribution.take_survey(members, self.config.model)
            info = await self._inspect(
                self.distribution.holders_first(members, self.config.model, survey)
            )
            if info is None:
                return
            if await self._adopt(members, info.num_layers):
                return
            draft_bytes = await self._draft_bytes(members)
            if draft_bytes is None:
                return
            if self.links.has_choices(members):
                # Which address each ring hop uses depends on the figures.
                self.problem = f"measuring the links between {len(members)} workers"
                await self.links.measure(members)
            assignments, self.plan = place(
                info,
                [m.describe for m in members],
                layers=self.config.layers,
                context=self.config.context,
                concurrency=self.config.concurrency,
                objective=self.config.objective,
                links=self.links.planner_links(),
                draft_bytes=draft_bytes,
            )
            drafting = bool(self.config.draft_model) and self.config.parallel == "auto"
            assignments, self.parallel = choose_split(
                info,
                [m.describe for m in members],
                assignments,
                # A draft model runs on pipelines only.
                parallel="pipeline" if drafting else self.config.parallel,
                layers=self.config.layers,
                context=self.config.context,
                concurrency=self.config.concurrency,
                objective=self.config.objective,
                links=self.links.planner_links(),
            )
            if drafting:
                self.parallel = ParallelChoice("pipeline", "a draft model runs on pipelines only")
            assignments = prefer_holders(
                assignments, [m.describe for m in members], survey, self.config.model
            )
            self.plan = relabel(self.plan, assignments)
            check_disk(assignments, survey, self.config.model)
            self.problem = f"fetching the stages of {self.config.model} that workers lack"
            # Each worker loads as soon as it holds its stage (a holder at once), so
            # loading overlaps the fetches still running; the ring forms once all are in.
            staged = self.distribution.stage_jobs(
                self.config.model,
                members,
                assignments,
                survey,
                self.config.load_timeout,
                lambda line: setattr(self, "problem", line),
            )
            await self._load(info, members, assignments, staged=staged)
        except PlacementError as e:
            self.reforming = False
            self.problem = str(e)
            self.monitor.events.record(ev.LOAD_FAILED, message=str(e))
            log.error("cannot place %s: %s", self.config.model, e)
            if isinstance(e, TransferFailed):
                # A cut transfer resumes where it stopped: try again shortly.
                asyncio.get_running_loop().call_later(RETRY_TRANSFER_S, self.note_change)
        finally:
            self.loading = False

    async def _refresh(self, members: list[Member]) -> list[Member]:
        """Describe ``members`` again; those that answer and are not held elsewhere.

        Plans and adoption must rest on what the workers say now, not on
        what they said when they joined.
        """
        challenge = new_challenge()
        replies = await asyncio.gather(
            *(
                m.stub.Describe(
                    worker_pb2.DescribeRequest(challenge=challenge), timeout=rpc.DESCRIBE_TIMEOUT
                )
                for m in members
            ),
            return_exceptions=True,
        )
        fresh, held = [], []
        for m, reply in zip(members, replies, strict=True):
            if not isinstance(reply, worker_pb2.DescribeReply):
                continue  # heartbeats decide whether it is lost
            if reply.node_id != m.node_id or not self._proven(reply, challenge):
                log.warning("%s at %s no longer proves it is %s", reply.name, m.address, m.name)
                continue
            m.describe = reply
            if reply.held_by and reply.held_by != self.coordinator_id:
                held.append(f"{m.name} (by coordinator {reply.held_by})")
            else:
                fresh.append(m)
        needed = self.needed()
        if held:
            log.warning("workers held by another coordinator: %s", ", ".join(held))
        if len(fresh) < needed:
            self.reforming = False
            self.problem = f"waiting for workers: {len(fresh)} of {needed} available" + (
                f"; held by another coordinator of this cluster: {', '.join(held)}" if held else ""
            )
            asyncio.get_running_loop().call_later(RETRY_PLAN_S, self.note_change)
            return []
        return fresh

    async def _adopt(self, members: list[Member], num_layers: int) -> bool:
        """Serve a pipeline that is already loaded (a restarted coordinator).

        Adopts it only when, as the workers describe themselves now, the
        shards are all ready, of one load of this model that never broke, and
        cover every layer of the model in rank order from a head that answers.
        """
        shards = [(m, m.describe.shard) for m in members]
        ready = [
            (m, s)
            for m, s in shards
            if s.state == worker_pb2.SHARD_STATE_READY and s.model == self.config.model
        ]
        if not ready or len({s.load_id for _, s in ready}) != 1:
            return False
        if ready[0][1].load_id in self._dead_loads:
            return False
        ready.sort(key=lambda ms: ms[1].rank)
        ends = [0] + [s.end_layer for _, s in ready]
        # A tensor parallel group: every rank holds (a slice of) every layer.
        tensor = is_tensor_layout(num_layers, [(s.start_layer, s.end_layer) for _, s in ready])
        if (
            [s.rank for _, s in ready] != list(range(len(ready)))
            or (not tensor and any(s.start_layer != ends[i] for i, (_, s) in enumerate(ready)))
            or ends[-1] != num_layers
            or any(s.world_size not in (0, len(ready)) for _, s in ready)
        ):
            return False
        head = ready[0][1]
        if not head.runner_address:
            return False
        assignments = tuple(
            Assignment(m.node_id, m.name, s.start_layer, s.end_layer, s.weights_bytes, tensor)
            for m, s in ready
        )
        shards_by_node = {m.node_id: s for m, s in ready}
        for m in self.members.values():
            if m.state != "lost":
                m.state = "serving" if m.node_id in shards_by_node else "idle"
        self.problem = ""
        await self._set_serving(
            Serving(
                head.load_id, head.runner_address, assignments, self.config.context, shards_by_node
            )
        )
        self.monitor.events.record(
            ev.PLAN_CHANGED,
            message=f"adopted the running load {head.load_id} of {self.config.model}",
        )
        log.info(
            "adopted the running pipeline %s; requests enter at %s",
            head.load_id,
            head.runner_address,
        )
        return True

    async def _draft_bytes(self, members: list[Member]) -> int | None:
        """The draft model's weights and KV at the planned context and concurrency (0
        without one), read by the first member that holds it; None: no member does."""
        draft = self.config.draft_model
        if not draft:
            return 0
        problems = []
        for member in members:
            try:
                info = await member.stub.InspectModel(
                    worker_pb2.InspectModelRequest(model=draft), timeout=rpc.INSPECT_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                problems.append(f"{member.name}: {e.details()}")
                continue
            profile = ModelProfile.from_json(info.profile_json)
            context = min(self.config.context, profile.max_context or self.config.context)
            kv = sum(
                profile.layer_kv_bytes(j, context, self.config.concurrency)
                for j in range(profile.num_layers)
            )
            return profile.weight_bytes + kv
        self.reforming = False
        self.problem = f"no worker can read the draft model {draft}: " + "; ".join(problems)
        self.monitor.events.record(ev.LOAD_FAILED, message=self.problem)
        log.error("%s", self.problem)
        return None

    async def _inspect(self, members: list[Member]) -> worker_pb2.ModelInfo | None:
        """The model's profile from the first member that can read it (once)."""
        if self._model_info is not None:
            return self._model_info
        local = await self.distribution.local_profile(self.config.model)
        if local is not None:
            self._model_info = local
            return local
        problems = []
        for member in members:
            try:
                self._model_info = await member.stub.InspectModel(
                    worker_pb2.InspectModelRequest(model=self.config.model),
                    timeout=rpc.INSPECT_TIMEOUT,
                )
                return self._model_info
            except grpc.aio.AioRpcError as e:
                problems.append((member, e))
        member, error = problems[0]
        self.reforming = False
        self.problem = error.details() or str(error.code())
        if any(
            e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            for _, e in problems
        ):
            # A busy or restarting worker: try again shortly.
            asyncio.get_running_loop().call_later(RETRY_PLAN_S, self.note_change)
        self.monitor.events.record(ev.LOAD_FAILED, member.node_id, member.name, self.problem)
        log.error("%s", self.problem)
        return None

    def _choose_backend(self, ordered: list[Member]) -> BackendChoice:
        failed = self._backend_failed.get(_facts_key(ordered))
        if failed is not None:
            return BackendChoice("ring", failed)
        nodes = [facts_of(m.name, m.describe.backend_facts, m.describe.backends) for m in ordered]
        return choose_backend(self.config.backend, nodes, [m.host for m in ordered])

    def _prompt_cache(
        self, info: worker_pb2.ModelInfo, assignments: list[Assignment]
    ) -> PromptCacheBudget | None:
        """The prefix cache's budget per stage; None (and the problem said) if it cannot fit."""
        free = (
            [(s.name, s.free_after_load_bytes) for s in self.plan.stages]
            if self.plan is not None
            else None
        )
        try:
            return prompt_cache_budget(
                ModelProfile.from_json(info.profile_json),
                [(a.start, a.end) for a in assignments],
                free,
                self.config.prompt_cache_gb,
            )
        except PromptCacheError as e:
            self.problem = str(e)
            self.monitor.events.record(ev.LOAD_FAILED, message=str(e))
            log.error("cannot load %s: %s", self.config.model, e)
            self.reforming = False
            return None

    async def _load(
        self,
        info: worker_pb2.ModelInfo,
        members: list[Member],
        assignments: list[Assignment],
        choice: BackendChoice | None = None,
        staged: dict[str, asyncio.Task[None]] | None = None,
    ) -> None:
        """Load the plan; a worker with a fetch in ``staged`` loads once it holds its stage."""
        staged = staged or {}
        for job in staged.values():
            job.add_done_callback(_observed)
        if staged and any(a.whole for a in assignments):
            # A tensor group joins before it loads (its slices are cut for the group,
            # within join_timeout): no rank starts before every rank holds the model.
            await all_staged(staged)
            staged = {}
        by_id = {m.node_id: m for m in members}
        ordered = [by_id[a.node_id] for a in assignments]
        choice = choice or self._choose_backend(ordered)
        if self.plan is not None:
            self.plan = replace(self.plan, backend=choice.backend)
        load_id = uuid.uuid4().hex[:12]
        hosts = self.links.ring_hosts(ordered)
        ring_hosts = [f"{h}:{m.describe.ring_port}" for h, m in zip(hosts, ordered, strict=True)]
        workers = [m.address for m in ordered]
        max_context = min(self.config.context, info.max_context or self.config.context)
        layout = ", ".join(
            f"{m.name} [{a.start}, {a.end})" for m, a in zip(ordered, assignments, strict=True)
        )
        tensor = any(a.whole for a in assignments)
        if tensor:
            layout = (
                f"tensor parallel, a slice of every layer on {', '.join(m.name for m in ordered)}"
            )
        if self.parallel is not None:
            layout += f" ({self.parallel.mode}: {self.parallel.reason})"
        self.problem = f"loading {self.config.model} on {len(ordered)} workers"
        self.monitor.events.record(
            ev.PLAN_CHANGED,
            message=f"{self.config.model}: {layout}; backend {choice.backend} ({choice.reason})"
            + _ring_note(ordered, hosts),
        )
        self.monitor.events.record(ev.LOAD_STARTED, message=f"load {load_id}")
        log.info("loading %s (%d layers): %s", self.config.model, info.num_layers, layout)
        cache = self._prompt_cache(info, assignments)
        if cache is None:
            return
        for m in ordered:
            m.state = "loading"
        requests = [
            worker_pb2.LoadRequest(
                load_id=load_id,
                model=self.config.model,
                start_layer=a.start,
                end_layer=a.end,
                rank=rank,
                world_size=len(ordered),
                ring_hosts=ring_hosts,
                workers=workers,
                backend=choice.backend,
                rdma=rdma_rows(choice),
                max_context=max_context,
                max_batch=self.config.max_batch,
                max_queue=self.config.max_queue,
                prefill_step=self.config.prefill_step,
                coordinator=self.coordinator_id,
                chat_template=self.config.chat_template,
                node_ids=[m.node_id for m in ordered],
                prompt_cache_bytes=cache.bytes,
                prompt_cache_token_bytes=cache.token_bytes,
                parallel="tensor" if tensor else "pipeline",
                draft_model=self.config.draft_model if rank == 0 else "",
                num_draft_tokens=self.config.num_draft_tokens if rank == 0 else 0,
            )
            for rank, a in enumerate(assignments)
        ]
        started = time.monotonic()
        # Early loads wait in their group for the fetches: their watch waits that long too.
        timeout = self.config.load_timeout + max(
            (
                self.distribution.deadline(self.config.load_timeout, a)
                for a in assignments
                if a.node_id in staged
            ),
            default=0.0,
        )
        results = await _first_failure(
            [
                self._load_one(m, r, staged.get(m.node_id), timeout)
                for m, r in zip(ordered, requests, strict=True)
            ]
        )
        transfer_failed = [r for r in results if isinstance(r, TransferFailed)]
        if transfer_failed:
            # Not the load's fault: tear it down, fetch again shortly (plan_and_load).
            self._dead_loads.add(load_id)
            await self._unload(ordered, load_id)
            for m in ordered:
                if m.state != "lost":
                    m.state = "idle"
            raise TransferFailed("; ".join(str(r) for r in transfer_failed))
        errors = {
            m.node_id: f"{m.name}: {r}"
            for m, r in zip(ordered, results, strict=True)
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        }
        group_failed = any(isinstance(r, GroupFailed) for r in results)
        if errors and group_failed and choice.backend != "ring":
            await self._fall_back(info, members, assignments, choice, load_id, errors)
            return
        if errors or any(m.state == "lost" for m in ordered):
            await self._load_failed(ordered, load_id, errors)
            return
        self._retries = 0
        for m in ordered:
            self._load_failures.pop(m.node_id, None)
        shards = {
            m.node_id: r
            for m, r in zip(ordered, results, strict=True)
            if isinstance(r, worker_pb2.ShardStatus)
        }
        head = shards[ordered[0].node_id]
        for m in self.members.values():
            if m.state != "lost":
                m.state = "serving" if m in ordered else "idle"
        self.problem = ""
        await self._set_serving(
            Serving(load_id, head.runner_address, tuple(assignments), max_context, shards)
        )
        self.monitor.events.record(
            ev.LOAD_FINISHED, message=f"load {load_id} in {time.monotonic() - started:.1f} s"
        )
        if not self.links.measured(members):
            # Nothing hung on the figures (one address per worker): measure them for
            # status, `pomona plan` and the next plan, without delaying this one, and a
            # little later, so the probes do not compete with the first requests.
            self._background(self._measure_later(members, load_id), "measuring links")
        log.info("serving %s; requests enter at %s", self.config.model, head.runner_address)

    async def _fall_back(
        self,
        info: worker_pb2.ModelInfo,
        members: list[Member],
        assignments: list[Assignment],
        choice: BackendChoice,
        load_id: str,
        errors: dict[str, str],
    ) -> None:
        """The chosen backend did not form: the same plan again, over the ring."""
        ordered = [m for m in members if any(a.node_id == m.node_id for a in assignments)]
        self._dead_loads.add(load_id)
        await self._unload(ordered, load_id)
        reason = (
            f"the {choice.backend} group did not form ({'; '.join(errors.values())}): "
            "loading the same plan over the ring"
        )
        self._backend_failed[_facts_key(ordered)] = reason
        self.monitor.events.record(ev.BACKEND_FALLBACK, message=reason)
        log.warning("%s", reason)
        await self._load(info, members, assignments, BackendChoice("ring", reason))

    async def _load_failed(
        self, ordered: list[Member], load_id: str, errors: dict[str, str]
    ) -> None:
        """Tear down a failed load; try again later, without a node that keeps failing."""
        self.reforming = False
        self._dead_loads.add(load_id)
        self.problem = "loading failed on " + ("; ".join(errors.values()) or "a lost worker")
        self.monitor.events.record(ev.LOAD_FAILED, message=self.problem)
        log.error("%s", self.problem)
        await self._unload(ordered, load_id)
        for m in ordered:
            if m.state != "lost":
                m.state = "idle"
        for m in ordered:
            if m.node_id not in errors:
                continue
            failures = self._load_failures.get(m.node_id, 0) + 1
            self._load_failures[m.node_id] = failures
            if failures >= LEAVE_OUT_AFTER and len(self.usable()) > 1:
                reason = errors[m.node_id]
                self.left_out[m.node_id] = (time.monotonic() + LEAVE_OUT_S, reason)
                message = (
                    f"left out of the plan after {failures} failed loads in a row, "
                    f"for {LEAVE_OUT_S / 60:.0f} min or until it restarts: {reason}"
                )
                self.monitor.events.record(ev.NODE_LEFT_OUT, m.node_id, m.name, message)
                log.error("%s %s", m.name, message)
        self._retries += 1
        delay = min(RETRY_MAX_S, RETRY_PLAN_S * 2 ** (self._retries - 1))
        self.problem += f" (trying again in {delay:.0f} s)"
        asyncio.get_running_loop().call_later(delay, self.note_change)

    async def _load_one(
        self,
        member: Member,
        request: worker_pb2.LoadRequest,
        staged: asyncio.Task[None] | None = None,
        timeout: float | None = None,
    ) -> worker_pb2.ShardStatus:
        if staged is not None:
            # Shielded: a load cancelled for another rank's failure leaves the fetch
            # running (it resumes anyway, but need not start over).
            await asyncio.shield(staged)
        try:
            await member.stub.Load(request, timeout=rpc.CONTROL_TIMEOUT)
            last = None
            async for status in member.stub.WatchShard(
                worker_pb2.WatchShardRequest(load_id=request.load_id),
                timeout=timeout or self.config.load_timeout,
            ):
                last = status
                if status.state == worker_pb2.SHARD_STATE_FAILED:
                    failure = GroupFailed if status.group_failed else RuntimeError
                    raise failure(status.error or "the runner failed")
            if last is None or last.state != worker_pb2.SHARD_STATE_READY:
                raise RuntimeError("the runner stopped before it was ready")
            return last
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(rpc.describe_error(e, member.address)) from e

    async def _unload(self, members: list[Member], load_id: str) -> None:
        async def one(m: Member) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await m.stub.Unload(
                    worker_pb2.UnloadRequest(load_id=load_id, coordinator=self.coordinator_id),
                    timeout=rpc.CONTROL_TIMEOUT,
                )

        await asyncio.gather(*(one(m) for m in members if m.state != "lost"))

    # -- failure ----------------------------------------------------------------------

    async def lose(self, member: Member, reason: str, *, node_lost: bool) -> None:
        """A member's node (``node_lost``) or its runner failed: re-form without it."""
        if node_lost and member.state != "lost":
            member.state = "lost"
            self.monitor.mark_lost(member.node_id, reason)
            log.error("worker %s (%s) lost: %s", member.name, member.node_id, reason)
        serving = self.serving
        if serving is None or not serving.holds(member.node_id):
            self.note_change()
            return
        self._dead_loads.add(serving.load_id)
        self.links.forget()  # a stalled ring may be a cut cable: measure again
        self.failure = f"{member.name} ({member.node_id}) {reason}"
        self.problem = f"re-forming the pipeline: {self.failure}"
        self.reforming = True
        self.monitor.events.record(ev.PIPELINE_FAILED, member.node_id, member.name, reason)
        await self._set_serving(None)
        plan_members = [self.members[a.node_id] for a in serving.assignments]
        # Unloading kills every runner of the group, also those blocked in a
        # collective on the lost peer.
        await self._unload(plan_members, serving.load_id)
        for m in plan_members:
            if m.state != "lost":
                m.state = "idle"
        await self.close_unused_channels()
        self.note_change()

    async def _measure_later(self, members: list[Member], load_id: str) -> None:
        await asyncio.sleep(LINKS_AFTER_SERVING_S)
        if self.serving is not None and self.serving.load_id == load_id:
            await self.links.measure(members)

    def _background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("%s failed: %s", what, t.exception())

        task.add_done_callback(done)

    async def _set_serving(self, serving: Serving | None) -> None:
        async with self._serving_changed:
            self.serving = serving
            if serving is not None:
                self.reforming = False
                self.ever_served = True
            self._serving_changed.notify_all()

    async def wait_serving(self, not_load_id: str, timeout: float) -> Serving | None:
        """The pipeline once it serves with a load other than ``not_load_id``."""

        def ready() -> bool:
            return self.serving is not None and self.serving.load_id != not_load_id

        async with self._serving_changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._serving_changed.wait_for(ready), timeout)
            return self.serving if ready() else None

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.serving is not None:
            members = [self.members[a.node_id] for a in self.serving.assignments]
            await self._unload(members, self.serving.load_id)
            self.serving = None
        for ch in self._channels.values():
            await ch.close()


def _ring_note(ordered: list[Member], hosts: list[str]) -> str:
    """Where the ring's addresses are not those the workers were found at: which."""
    if all(h == m.host for m, h in zip(ordered, hosts, strict=True)):
        return ""
    return "; ring over " + ", ".join(f"{m.name} {h}" for m, h in zip(ordered, hosts, strict=True))


def _facts_key(members: list[Member]) -> frozenset[tuple[str, bytes]]:
    facts = [m.describe.backend_facts.SerializeToString(deterministic=True) for m in members]
    return frozenset(zip((m.node_id for m in members), facts, strict=True))


def _observed(task: asyncio.Future[None]) -> None:
    """Retrieve a finished fetch's exception (its load reports it, if still waiting)."""
    if not task.cancelled():
        task.exception()


async def _first_failure(calls: list[Any]) -> list[object]:
    """Run ``calls`` together; once one fails, cancel the rest.

    Returns each call's result, exception, or ``CancelledError``. Ranks of a
    group wait for each other in the ring: when one cannot load, the others
    would otherwise wait out the whole load timeout.
    """
    tasks = [asyncio.ensure_future(c) for c in calls]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    results: list[object] = []
    for task in tasks:
        if task.cancelled():
            results.append(asyncio.CancelledError())
        else:
            results.append(task.exception() or task.result())
    return results
