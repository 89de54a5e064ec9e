"""What every client command shares: the coordinator's address and credentials."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from pomona import rpc
from pomona.config import DEFAULT_COORDINATOR_PORT
from pomona.credentials import CONFIG_OPTION, client_auth
from pomona.v1 import coordinator_pb2_grpc

F = TypeVar("F", bound=Callable[..., Any])

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
