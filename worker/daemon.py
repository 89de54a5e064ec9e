"""The worker daemon: one per machine.

Advertises itself over Bonjour, serves the Worker control plane and the
standard gRPC health service, and starts, watches and stops runner processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pomona import rpc
from pomona.backends import BACKENDS, RankHost, devices_from_wire, rank_launch
from pomona.chips import chip_bandwidth_gbs
from pomona.config import (
    MAX_CHAT_TEMPLATE_CHARS,
    MAX_DRAFT_TOKENS,
    PROTOCOL_VERSION,
    WorkerConfig,
)
from pomona.mdns import make_zeroconf
from pomona.model_profile import ModelProfile
from pomona.model_store import ModelStore
from pomona.models import ModelNotFound, ModelRefused, resolve_model
from pomona.stage_cache import StageCache, StageKey
from pomona.tokens import describe_proof
from pomona.v1 import transfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from pomona.worker.advertise import service_info
from pomona.worker.backend_facts import facts_to_proto, interface_peers, read_backend_facts
from pomona.worker.bandwidth import Speed, cached_speed
from pomona.worker.hardware import HardwareInfo, read_hardware
from pomona.worker.identity import load_node_id, machine_fingerprint
from pomona.worker.lease import Lease
from pomona.worker.link_probe import LinkProbeError, LinkSink, check_probe_request, probe
from pomona.worker.runner import RunnerSpec
from pomona.worker.runner_process import TERMINAL, RunnerProcess, ShardInfo, State
from pomona.worker.sampler import Sampler
from pomona.worker.telemetry import effective_interval, telemetry_stream
from pomona.worker.transfer_service import TransferService
from pomona.worker.warm_runner import REFILL_AFTER_READY_S, WarmRunner

log = logging.getLogger(__name__)

MAX_CHALLENGE_BYTES = 64
MAX_SINKS = 8  # link probe sinks open at once


def shard_to_proto(info: ShardInfo) -> worker_pb2.ShardStatus:
    return worker_pb2.ShardStatus(
        load_id=info.load_id,
        state=getattr(worker_pb2, f"SHARD_STATE_{info.state.name}"),
        model=info.model,
        start_layer=info.start,
        end_layer=info.end,
        rank=info.rank,
        progress=info.progress,
        runner_address=info.runner_address,
        error=info.error,
        runner_pid=info.pid,
        weights_bytes=info.weights_bytes,
        files=list(info.files),
        active_bytes=info.active_bytes,
        world_size=info.world_size,
        group_failed=info.group_failed,
        backend=info.backend,
    )


def hardware_to_proto(
    hw: HardwareInfo, cap: int = 0, speed: Speed | None = None
) -> worker_pb2.Hardware:
    limit = hw.gpu_memory_limit_bytes or hw.total_memory_bytes
    if cap:
        limit = min(limit, cap)
    return worker_pb2.Hardware(
        hostname=hw.hostname,
        os=hw.os,
        chip=hw.chip or "",
        machine_model=hw.machine_model or "",
        cpu_cores=hw.cpu_cores,
        gpu_cores=hw.gpu_cores or 0,
        total_memory_bytes=hw.total_memory_bytes,
        available_memory_bytes=psutil.virtual_memory().available,
        gpu_memory_limit_bytes=limit,
        rdma=hw.rdma_enabled,
        measured_bandwidth_gbs=speed.bandwidth_gbs if speed else None,
        measured_tflops=speed.tflops if speed else None,
    )


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append(a.address)
    return out or ["127.0.0.1"]


def launch_hosts(r: worker_pb2.LoadRequest) -> list[RankHost]:
    """Every rank of the group as pomona.backends takes it."""
    rows = [tuple(devices_from_wire(p.devices) for p in row.peers) for row in r.rdma]
    return [
        RankHost((address,), rows[rank] if rows else ())
        for rank, address in enumerate(r.ring_hosts)
    ]


def config_layers(path: Path) -> int:
    """The layer count in a model's config.json (0 when it does not say)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return int(config.get("num_hidden_layers") or text.get("num_hidden_layers") or 0)


class WorkerDaemon(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.node_id = load_node_id(config.state_dir)
        self.hardware = read_hardware()
        self.backend_facts = read_backend_facts()
        self.runner: RunnerProcess | None = None
        self._runner_started = asyncio.Condition()  # notified when ``runner`` is replaced
        self.waiting_for_load = 0  # WatchShard calls holding on until their load arrives
        self.lease = Lease()
        # Open telemetry streams per coordinator: the last one closing frees its lease.
        self._watchers: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._sinks: list[LinkSink] = []  # link probes' sinks (LinkListen)
        self.addresses = list(config.addresses) or local_addresses()
        # Measured (once per machine, before serving) only where Apple's
        # table does not know the chip or this variant of it.
        self.speed: Speed | None = None
        self.stage_cache = StageCache(config.cache_dir, config.cache_max_bytes)
        self.spare = WarmRunner(config.spare_runner)
        self._refill: asyncio.Task[None] | None = None

    async def measure_speed(self) -> None:
        if chip_bandwidth_gbs(self.hardware.chip, self.hardware.gpu_cores) is not None:
            return
        self.speed = await asyncio.to_thread(
            cached_speed, self.config.state_dir, machine_fingerprint()
        )

    # -- Worker service -------------------------------------------------------

    async def Describe(self, request, context):  # noqa: N802
        if len(request.challenge) > MAX_CHALLENGE_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the challenge is over {MAX_CHALLENGE_BYTES} bytes",
            )
        reply = self._describe()
        secrets = self.config.auth.secrets if self.config.auth else None
        if secrets is not None:
            body = reply.SerializeToString(deterministic=True)
            reply.proof = describe_proof(secrets, request.challenge, self.node_id, body)
        return reply

    def _describe(self) -> worker_pb2.DescribeReply:
        hw = read_hardware()  # interfaces and their link state as they are now
        peers = interface_peers(self.backend_facts)
        return worker_pb2.DescribeReply(
            node_id=self.node_id,
            name=self.config.name,
            cluster=self.config.cluster,
            protocol_version=PROTOCOL_VERSION,
            hardware=hardware_to_proto(hw, self.config.max_memory_bytes, self.speed),
            mlx_version=hw.mlx_version or "",
            backends=list(hw.distributed_backends),
            interfaces=[
                worker_pb2.NetworkInterface(
                    name=i.name,
                    addresses=list(i.addresses),
                    kind=i.kind,
                    is_up=i.is_up,
                    speed_mbps=i.speed_mbps or 0,
                    link_state=i.link_state,
                    peer_domain_uuid=peers.get(i.name, ""),
                )
                for i in hw.interfaces
            ],
            ring_port=self.config.effective_ring_port,
            shard=shard_to_proto(self.runner.info if self.runner else ShardInfo()),
            held_by=self.lease.live_holder(),
            backend_facts=facts_to_proto(self.backend_facts),
        )

    def _resolve(self, name: str) -> Path:
        return resolve_model(
            name,
            self.config.model_dirs,
            demo_cache=self.config.state_dir / "models",
            allow_remote_code=self.config.allow_remote_code,
        )

    async def _path(self, name: str, context: grpc.aio.ServicerContext) -> Path:
        """The model's folder, or the call aborted with why not."""
        try:
            return await asyncio.to_thread(self._resolve, name)
        except ModelRefused as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except (OSError, ValueError) as e:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot read model {name!r}: {e}"
            )
        raise AssertionError("abort raises")

    async def _model(
        self, name: str, context: grpc.aio.ServicerContext
    ) -> tuple[Path, ModelProfile]:
        """The model's folder and profile, or the call aborted with why not."""
        path = await self._path(name, context)
        try:
            return path, await asyncio.to_thread(ModelProfile.from_model_dir, path)
        except (OSError, ValueError) as e:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot read model {name!r}: {e}"
            )
        raise AssertionError("abort raises")

    async def InspectModel(self, request, context):  # noqa: N802
        path, profile = await self._model(request.model, context)
        return worker_pb2.ModelInfo(
            model=request.model,
            path=str(path),
            model_type=profile.model_type,
            num_layers=profile.num_layers,
            layer_bytes=list(profile.layer_weight_bytes),
            other_bytes=profile.embedding_bytes + profile.head_bytes,
            max_context=profile.max_context or 0,
            vocab_size=profile.vocab_size,
            profile_json=profile.to_json(),
        )

    async def _hold(self, coordinator: str, context: grpc.aio.ServicerContext) -> None:
        """Abort unless ``coordinator`` holds (or may take) this worker's lease."""
        holder = self.lease.claim(coordinator)
        if holder:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.config.name} is held by coordinator {holder}; stop that coordinator "
                f"or wait {self.lease.ttl:.0f} s after it stops",
            )

    async def Load(self, request, context):  # noqa: N802
        problem = self._check_load(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self._hold(request.coordinator, context)
        # Only what is quick: this call has a short deadline, and importing a
        # model's code can take seconds on a busy machine. The runner checks
        # the rest as it loads.
        path, num_layers = await self._stage_or_model(request, context)
        if num_layers and request.end_layer > num_layers:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"layers [{request.start_layer}, {request.end_layer}) are outside "
                f"{request.model}'s {num_layers} layers",
            )
        draft_path = await self._draft_path(request, context)
        async with self._lock:
            if self.runner is not None:
                await self.runner.stop()
            # The head runner is reached where the coordinator reaches this daemon (the
            # ring may run on another network, one the coordinator is not on).
            own = request.workers[request.rank].rsplit(":", 1)[0]
            spec = RunnerSpec(
                load_id=request.load_id,
                model_path=str(path),
                start=request.start_layer,
                end=request.end_layer,
                rank=request.rank,
                world_size=request.world_size,
                backend=request.backend or "ring",
                workers=tuple(request.workers),
                serve_host=self.config.host,
                serve_port=self.config.effective_runner_port,
                advertise_host=own,
                node_id=self.node_id,
                node_ids=tuple(request.node_ids),
                max_context=request.max_context,
                cluster_config=str(self.config.cluster_config or ""),
                allow_remote_code=self.config.allow_remote_code,
                max_batch=request.max_batch or RunnerSpec.max_batch,
                max_queue=request.max_queue or RunnerSpec.max_queue,
                prefill_step=request.prefill_step,  # 0: the runner chooses
                chat_template=request.chat_template,
                prompt_cache_bytes=request.prompt_cache_bytes,
                prompt_cache_token_bytes=request.prompt_cache_token_bytes,
                parallel=request.parallel or "pipeline",
                model=request.model,
                draft_model_path=str(draft_path or ""),
                draft_model=request.draft_model if draft_path else "",
                num_draft_tokens=request.num_draft_tokens or RunnerSpec.num_draft_tokens,
            )
            launch = rank_launch(spec.backend, spec.rank, launch_hosts(request))
            self.runner = RunnerProcess(
                spec,
                request.model,
                launch,
                self.config.state_dir / "runs",
                self.config.load_timeout,
            )
            await self.runner.start(warm=self.spare.take(launch.env))
            async with self._runner_started:
                self._runner_started.notify_all()
            if self.runner.adopted:
                self._refill = asyncio.create_task(self._refill_spare(self.runner))
            return shard_to_proto(self.runner.info)

    async def _draft_path(
        self, r: worker_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> Path | None:
        """The head's draft model folder (speculative decoding), or the call aborted."""
        if not r.draft_model or r.rank != 0:
            return None
        try:
            return await asyncio.to_thread(self._resolve, r.draft_model)
        except ModelRefused as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except (ModelNotFound, OSError, ValueError) as e:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"the draft model {r.draft_model!r} is not on {self.config.name}, the head "
                f"worker (it runs the draft): {e}",
            )
        raise AssertionError("abort raises")

    async def _stage_or_model(
        self, r: worker_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Path, int]:
        """The model's folder here, else a stage folder received for this range."""
        # A tensor rank needs every tensor, as the only stage of a pipeline does.
        rank, world = (0, 1) if r.parallel == "tensor" else (r.rank, r.world_size)
        key = StageKey.of(r.start_layer, r.end_layer, rank, world)
        folder = await asyncio.to_thread(self.stage_cache.find, r.model, key)
        if folder is not None:
            try:
                await asyncio.to_thread(self._resolve, r.model)
            except ModelRefused as e:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            except (ModelNotFound, OSError):
                self.stage_cache.touch(folder.path)
                return folder.path, folder.num_layers
        path = await self._path(r.model, context)
        return path, await asyncio.to_thread(config_layers, path)

    def _check_load(self, r: worker_pb2.LoadRequest) -> str:
        if not r.load_id or len(r.load_id) > 64:
            return "load_id must be 1 to 64 characters"
        if not 1 <= r.world_size <= 256:
            return f"world_size must be 1..256, got {r.world_size}"
        if not 0 <= r.rank < r.world_size:
            return f"rank {r.rank} is outside a group of {r.world_size}"
        if len(r.ring_hosts) != r.world_size or len(r.workers) != r.world_size:
            return "ring_hosts and workers must list every rank"
        if r.node_ids and len(r.node_ids) != r.world_size:
            return "node_ids must list every rank"
        if not 0 <= r.start_layer < r.end_layer:
            return f"the layer range [{r.start_layer}, {r.end_layer}) is empty or negative"
        if not 0 <= r.max_batch <= 64 or not 0 <= r.max_queue <= 100_000:
            return "max_batch must be 0..64 and max_queue 0..100000"
        if not 0 <= r.prefill_step <= 65536:
            return "prefill_step must be 0..65536"
        if not 0 <= r.num_draft_tokens <= MAX_DRAFT_TOKENS:
            return f"num_draft_tokens must be 0..{MAX_DRAFT_TOKENS}"
        if len(r.chat_template) > MAX_CHAT_TEMPLATE_CHARS:
            return f"the chat template is over {MAX_CHAT_TEMPLATE_CHARS} characters"
        if r.parallel not in ("", "pipeline", "tensor"):
            return f"unknown parallel mode {r.parallel!r}; use pipeline or tensor"
        if r.parallel == "tensor" and (r.start_layer != 0 or r.world_size < 2):
            return "a tensor parallel rank holds every layer (start_layer 0) of 2 or more ranks"
        backend = r.backend or "ring"
        if backend not in BACKENDS:
            return f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}"
        if r.rdma and (
            len(r.rdma) != r.world_size or any(len(row.peers) != r.world_size for row in r.rdma)
        ):
            return "rdma must list every rank's devices towards every rank"
        # A backend this MLX lacks is left to the runner: its init says why, and the
        # coordinator forms the group again over the ring.
        return ""

    async def Unload(self, request, context):  # noqa: N802
        await self._hold(request.coordinator, context)
        async with self._lock:
            runner = self.runner
            if runner is None or (request.load_id and request.load_id != runner.spec.load_id):
                return shard_to_proto(ShardInfo(request.load_id, State.STOPPED))
            await runner.stop()
            return shard_to_proto(runner.info)

    async def WatchShard(self, request, context):  # noqa: N802
        runner = self.runner
        if request.wait_for_load:
            runner = await self._runner_of(request.load_id, context.time_remaining())
        if runner is None or runner.spec.load_id != request.load_id:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no shard with load_id {request.load_id!r} here"
            )
        seen = None
        while True:
            info = await runner.wait_change(seen, timeout=30.0)
            if info is not seen:
                yield shard_to_proto(info)
            if info.state in (State.READY, *TERMINAL):
                return
            seen = info

    async def _runner_of(self, load_id: str, timeout: float | None) -> RunnerProcess | None:
        """The runner of ``load_id``, waiting up to ``timeout`` (at most a minute) for it."""

        def arrived() -> bool:
            return self.runner is not None and self.runner.spec.load_id == load_id

        async with self._runner_started:
            self.waiting_for_load += 1
            try:
                await asyncio.wait_for(
                    self._runner_started.wait_for(arrived), min(timeout or 60.0, 60.0)
                )
            except asyncio.TimeoutError:
                pass
            finally:
                self.waiting_for_load -= 1
        return self.runner

    async def Wake(self, request, context):  # noqa: N802
        runner = self.runner
        if runner is None or runner.spec.load_id != request.load_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"no runner for load {request.load_id!r}"
            )
        try:
            await runner.send({"cmd": "wake", "session": request.session})
        except (RuntimeError, ConnectionError) as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return worker_pb2.WakeReply()

    async def Telemetry(self, request, context):  # noqa: N802
        interval = effective_interval(request.interval_s)
        watchers = self._watchers
        watchers[request.coordinator] = watchers.get(request.coordinator, 0) + 1
        try:
            async for sample in telemetry_stream(
                Sampler, self._runner_state, self.node_id, interval
            ):
                self.lease.claim(request.coordinator)
                yield sample
        finally:
            watchers[request.coordinator] -= 1
            if not watchers[request.coordinator]:
                del watchers[request.coordinator]
                self.lease.release(request.coordinator)

    async def LinkListen(self, request, context):  # noqa: N802
        self._sinks = [s for s in self._sinks if s.alive()]
        if len(self._sinks) >= MAX_SINKS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_SINKS} link probes are open already; try again when they end",
            )
        try:
            sink = LinkSink(request.host, request.max_bytes)
        except LinkProbeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._sinks.append(sink)
        return worker_pb2.LinkListenReply(port=sink.port, ticket=sink.ticket)

    async def LinkProbe(self, request, context):  # noqa: N802
        r = request
        try:
            check_probe_request(r.host, r.port, r.ticket, r.bytes, r.pings, r.timeout_s, r.send_s)
        except LinkProbeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            result = await asyncio.to_thread(
                probe, r.host, r.port, r.ticket, r.bytes, r.pings, r.timeout_s, r.send_s
            )
        except (OSError, ConnectionError, struct.error) as e:
            why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            return worker_pb2.LinkProbeReply(error=f"{r.host}:{r.port}: {why}")
        return worker_pb2.LinkProbeReply(
            rtt_ms=result.rtt_ms,
            bandwidth_bytes_per_s=result.bandwidth_bytes_per_s,
            bytes=result.bytes,
        )

    def _runner_state(self) -> tuple[worker_pb2.ShardStatus | None, dict[str, object]]:
        runner = self.runner
        if runner is None:
            return None, {}
        stats = runner.stats if runner.info.state not in TERMINAL else {}
        return shard_to_proto(runner.info), stats

    # -- lifecycle --------------------------------------------------------------

    async def _refill_spare(self, runner: RunnerProcess) -> None:
        """Another spare once ``runner``, which took the last one, is up (or failed):
        the next load — a re-form after a failure — starts without the imports.

        After a runner that came up, not at once: the spare's imports are seconds
        of CPU, which the first requests would share (a failure refills at once).
        """
        info = runner.info
        while info.state not in (State.READY, *TERMINAL):
            info = await runner.wait_change(info, 60.0)
        deadline = time.monotonic() + REFILL_AFTER_READY_S
        while info.state not in TERMINAL and (left := deadline - time.monotonic()) > 0:
            info = await runner.wait_change(info, left)
        await self.spare.ensure()

    async def surveyed(self) -> None:
        """A coordinator asked what this machine holds: a load may follow soon."""
        runner = self.runner
        if runner is None or runner.info.state in TERMINAL:
            await self.spare.ensure()

    async def shutdown(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
        await self.spare.stop()
        if self.runner is not None:
            await self.runner.stop(grace=2.0)


async def serve(
    config: WorkerConfig, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run a worker until ``stop`` is set (or forever)."""
    daemon = WorkerDaemon(config)
    # Before anyone can describe this worker: a plan made while one worker's speed is
    # measured and another's assumed splits layers by numbers 50x apart. Measured once
    # per machine (1-2 s on a CPU), then read from the state directory.
    await daemon.measure_speed()
    server = rpc.aio_server(config.auth, target=daemon.node_id)
    worker_pb2_grpc.add_WorkerServicer_to_server(daemon, server)
    transfer_pb2_grpc.add_ModelTransferServicer_to_server(transfer_service(daemon), server)
    health_servicer = (
        health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = rpc.add_port(server, f"{config.host}:{config.port}", config.auth)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    await _set_serving(health_servicer)
    await daemon.spare.ensure()  # a runner that has done its imports waits for the first load
    if config.spare_runner:
        # A model's profile (InspectModel, before every first plan) builds mlx-lm's model
        # class: the first import of mlx-lm (and transformers) takes 1.5 s here and
        # 12-16 s on a Mac with PyTorch installed. Done now, in the background, it is not
        # on the path of a coordinator's first plan.
        asyncio.get_running_loop().run_in_executor(None, _import_mlx_lm)
    info = service_info(
        config.name,
        daemon.addresses,
        port,
        {
            "node_id": daemon.node_id,
            "protocol": str(PROTOCOL_VERSION),
            "cluster": config.cluster,
            "name": config.name,
            "grpc_port": str(port),
            "memory": str(daemon.hardware.total_memory_bytes),
            "chip": (daemon.hardware.chip or "unknown")[:120],
        },
    )
    zc = make_zeroconf(config.mdns_interfaces)
    try:
        await zc.async_register_service(info)
        log.info(
            "worker %s (node %s) serving on port %d, cluster %r",
            config.name,
            daemon.node_id,
            port,
            config.cluster,
        )
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        with contextlib.suppress(Exception):
            await zc.async_unregister_service(info)
        await zc.async_close()
        await daemon.shutdown()
        await server.stop(grace=1.0)


def _import_mlx_lm() -> None:
    try:
        import mlx_lm.utils  # noqa: F401
    except Exception as e:  # a model's profile reports it when it is needed
        log.warning("cannot import mlx-lm: %s", e)


def transfer_service(daemon: WorkerDaemon) -> TransferService:
    """Model distribution: serves what this worker holds, fetches the stages it lacks."""
    store = ModelStore(daemon._resolve, daemon.config.model_dirs, daemon.stage_cache)

    def in_use() -> list[Path]:
        runner = daemon.runner
        return [Path(runner.spec.model_path)] if runner is not None else []

    return TransferService(store, daemon.config.auth, in_use, on_survey=daemon.surveyed)


async def _set_serving(servicer: object) -> None:
    result = servicer.set("", health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]
    if asyncio.iscoroutine(result):
        await result
    result = servicer.set("pomona.v1.Worker", health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]
    if asyncio.iscoroutine(result):
        await result
