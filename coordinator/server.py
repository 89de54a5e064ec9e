"""Running a coordinator: gRPC server, discovery and the planning loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging

from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pomona import rpc
from pomona.config import LOOPBACK_HOSTS, CoordinatorConfig
from pomona.coordinator.cluster import Cluster
from pomona.coordinator.discovery import Browser
from pomona.coordinator.distribution import LocalModels
from pomona.coordinator.events import EventLog, events_path, prune_event_logs
from pomona.coordinator.health import HealthWatcher
from pomona.coordinator.metrics import metrics_route
from pomona.coordinator.monitor import Monitor, Thresholds
from pomona.coordinator.openai_api import create_app
from pomona.coordinator.router import Router
from pomona.coordinator.service import CoordinatorService
from pomona.model_source import ModelSource
from pomona.v1 import coordinator_pb2_grpc, transfer_pb2_grpc

log = logging.getLogger(__name__)

SEED_RETRY_SECONDS = 5.0


async def serve(config: CoordinatorConfig, stop: asyncio.Event | None = None) -> None:
    # The port first: a coordinator that cannot have it touches nothing else
    # (another one may be serving this cluster from this state folder).
    server = rpc.aio_server(config.auth)
    port = rpc.add_port(server, f"{config.host}:{config.port}", config.auth)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # A sample is due every second: late (degraded) after 2.5 s, lost at the
    # heartbeat timeout.
    late = min(max(2.5, config.heartbeat_timeout / 2), 0.9 * config.heartbeat_timeout)
    thresholds = Thresholds(late_after_s=late, lost_after_s=config.heartbeat_timeout)
    events = events_path(config.state_dir, config.cluster)
    prune_event_logs(events)
    monitor = Monitor(EventLog(events), thresholds)
    cluster = Cluster(config, monitor)
    router = Router(cluster)
    service = CoordinatorService(cluster, router)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    if config.model_dirs:
        # The coordinator's own models, served to workers like a worker serves its own.
        local = LocalModels(config.model_dirs, config.host, port)
        cluster.distribution.local = local
        transfer_pb2_grpc.add_ModelTransferServicer_to_server(ModelSource(local.store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def found(address: str, props: dict[str, str]) -> None:
        await cluster.add_address(address, props)

    async def seeds() -> None:
        pending = set(config.seeds)
        while pending:
            for address in sorted(pending):
                if await cluster.add_address(address) is not None:
                    pending.discard(address)
            if pending:
                await asyncio.sleep(SEED_RETRY_SECONDS)

    metrics = metrics_route(service.status_reply, monitor.events.counts)
    try:
        http = await start_http(config, router, [metrics])
    except OSError:
        await server.stop(grace=None)  # or grpc complains at exit, with a traceback
        monitor.events.close()
        raise
    log.info("coordinator for cluster %r on port %d, model %s", config.cluster, port, config.model)
    watcher = HealthWatcher(cluster, config.heartbeat_timeout)
    tasks = [
        asyncio.create_task(cluster.run()),
        asyncio.create_task(seeds()),
        asyncio.create_task(watcher.run()),
    ]
    try:
        async with Browser(config.cluster, config.mdns_interfaces, found):
            await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        if http is not None:
            await http.cleanup()
        await cluster.shutdown()
        await server.stop(grace=1.0)
        monitor.events.close()


async def start_http(
    config: CoordinatorConfig, router: Router, extra_routes: list[web.RouteDef]
) -> web.AppRunner | None:
    """The OpenAI-compatible API and /metrics on config.http_port (0: none)."""
    if not config.http_port:
        return None
    app = create_app(
        generate=router.generate,
        model_name=router.model_name,
        api_key=config.api_key or None,
        extra_routes=extra_routes,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host = config.http_host
    site = web.TCPSite(runner, host, config.http_port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {config.http_port} is in use; pass --http-port with a free port "
                "(0: no HTTP API)"
            ) from e
        raise OSError(f"cannot serve HTTP on {host}:{config.http_port}: {e.strerror}") from e
    log.info("OpenAI-compatible API on http://%s:%d/v1", host, config.http_port)
    if host != config.host:
        log.warning(
            "the HTTP API has no key, so it listens on %s only: set one (`pomona init "
            "--api-key`, --api-key-file) or pass --insecure-http to serve it on %s",
            host,
            config.host,
        )
    elif not config.api_key and host not in LOOPBACK_HOSTS:
        log.warning("the HTTP API on %s has no key: anyone who can reach it can use it", host)
    return runner
