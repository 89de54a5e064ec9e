"""What every client command shares: the coordinator's address and credentials."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from pomona import rpc
from pomona.config import DEFAULT_COORDINATOR_PORT
from pomona.credentials import CONFIG_OPTION, client_auth
from pomona.v1 import coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

F = TypeVar("F", bound=Callable[..., Any])

# Probing what listens at a wrong address: short, the user is waiting for an error.
PROBE_TIMEOUT = 2.0
WHERE_COORDINATOR = (
    f"the coordinator's gRPC API listens on its --port ({DEFAULT_COORDINATOR_PORT} by default)"
)

_COORDINATOR = click.option(
    "--coordinator",
    envvar="POMONA_COORDINATOR",
    default=f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}",
    show_default=True,
    help="HOST:PORT of the coordinator (or set POMONA_COORDINATOR).",
)


def coordinator_options(f: F) -> F:
    """--coordinator HOST:PORT and --config PATH."""
    return _COORDINATOR(CONFIG_OPTION(f))


def check_address(address: str, what: str = "--coordinator") -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{address!r} is not HOST:PORT", param_hint=what)


def coordinator_channel(address: str, config_path: Path | None) -> grpc.Channel:
    check_address(address)
    return rpc.channel(address, client_auth(config_path, address))


def coordinator_stub(
    address: str, config_path: Path | None
) -> coordinator_pb2_grpc.CoordinatorStub:
    return coordinator_pb2_grpc.CoordinatorStub(coordinator_channel(address, config_path))


def coordinator_error(err: grpc.RpcError, address: str, config_path: Path | None = None) -> str:
    """`rpc.describe_error` for a call meant for the coordinator at ``address``; when
    something else listens there (a worker, the HTTP API), says so and where to go."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        worker = _describe_worker(address, config_path)
        if worker is not None:
            return (
                f"{address} is a Pomona worker ({worker.name} of cluster {worker.cluster}), "
                f"not the coordinator; {WHERE_COORDINATOR}"
            )
        return f"{address} is not a Pomona coordinator; {WHERE_COORDINATOR}"
    if code == grpc.StatusCode.UNAVAILABLE and "http1.x server" in details.lower():
        if _is_http_api(address):
            return (
                f"{address} is the coordinator's HTTP API port (http://{address}/v1), "
                f"not its gRPC one; {WHERE_COORDINATOR}"
            )
        return f"{address} is an HTTP port, not the coordinator's; {WHERE_COORDINATOR}"
    return rpc.describe_error(err, address)


def _describe_worker(address: str, config_path: Path | None) -> worker_pb2.DescribeReply | None:
    channel = rpc.channel(address, client_auth(config_path))
    try:
        stub = worker_pb2_grpc.WorkerStub(channel)
        return stub.Describe(worker_pb2.DescribeRequest(), timeout=PROBE_TIMEOUT)  # type: ignore[no-any-return]
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def _is_http_api(address: str) -> bool:
    """Whether ``address`` answers /health as the coordinator's HTTP API does."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=PROBE_TIMEOUT) as r:
            body = r.read(4096)
    except urllib.error.HTTPError as e:  # 503 while not serving: still the API
        body = e.read(4096)
    except (OSError, ValueError):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and "status" in data
