"""`pomona status` and `pomona events`: the cluster's health from the coordinator."""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import grpc
from google.protobuf.json_format import MessageToDict

from pomona import rpc
from pomona.client import coordinator_error, coordinator_options, coordinator_stub
from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

__all__ = ["EVENT_SCHEMA", "event_json", "event_line", "events_command", "status_command"]

EVENT_SCHEMA = "pomona.event/v1"
# A followed event stream is long-lived; it is renewed at this deadline, not ended.
FOLLOW_TIMEOUT = 3600.0
RECONNECT_S = 1.0


def _stub(address: str, config_path: Path | None) -> coordinator_pb2_grpc.CoordinatorStub:
    try:
        return coordinator_stub(address, config_path)
    except click.BadParameter as e:
        raise click.ClickException(f"--coordinator: {address!r} is not HOST:PORT") from e


def _fail(err: grpc.RpcError, address: str, config_path: Path | None) -> click.ClickException:
    return click.ClickException(coordinator_error(err, address, config_path))


@click.command("status")
@click.option("--watch", is_flag=True, help="A live view, refreshed until q or Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="JSON (schema pomona.status/v1).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@coordinator_options
def status_command(
    watch: bool, as_json: bool, interval: float, coordinator: str, config_path: Path | None
) -> None:
    """Every node's state and health, and the cluster's figures.

    With --watch --json, one JSON document per line at each refresh.
    """
    from pomona.status_view import print_status, run_live, status_json

    stub = _stub(coordinator, config_path)

    def fetch() -> coordinator_pb2.StatusReply:
        return stub.Status(coordinator_pb2.StatusRequest(), timeout=rpc.DESCRIBE_TIMEOUT)

    try:
        reply = fetch()
    except grpc.RpcError as e:
        raise _fail(e, coordinator, config_path) from None
    if not watch:
        if as_json:
            click.echo(json.dumps(status_json(reply), indent=2))
        else:
            print_status(reply)
        return
    if as_json:
        _watch_json(fetch, interval, coordinator, config_path)
        return
    if not sys.stdout.isatty():
        raise click.ClickException("--watch needs a terminal; --watch --json streams JSON lines")

    def fetch_for_view() -> coordinator_pb2.StatusReply:
        try:
            return fetch()
        except grpc.RpcError as e:
            raise RuntimeError(coordinator_error(e, coordinator, config_path)) from None

    run_live(fetch_for_view, refresh_s=interval, title=f"pomona status · {coordinator}")


def _watch_json(
    fetch: Callable[[], coordinator_pb2.StatusReply],
    interval: float,
    coordinator: str,
    config_path: Path | None,
) -> None:
    from pomona.status_view import status_json

    try:
        while True:
            started = time.monotonic()
            try:
                click.echo(json.dumps(status_json(fetch()), separators=(",", ":")))
            except grpc.RpcError as e:
                raise _fail(e, coordinator, config_path) from None
            sys.stdout.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return


# ---- events ------------------------------------------------------------------------


def event_line(event: coordinator_pb2.Event) -> str:
    """`2025-05-01 14:03:07  node_lost       mini-2  no telemetry for 5 s`, local time."""
    at = datetime.datetime.fromtimestamp(event.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    node = event.node_name or event.node_id or "-"
    return f"{at}  {event.kind:<15} {node}  {event.message}".rstrip()


def event_json(event: coordinator_pb2.Event) -> dict[str, object]:
    """One line of `pomona events --json`: `schema`, then the event by the proto3 JSON
    mapping with proto field names (`seq` is a string, as 64-bit integers are)."""
    body = MessageToDict(
        event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {"schema": EVENT_SCHEMA, **body}


def _events(
    stub: coordinator_pb2_grpc.CoordinatorStub, after: int, follow: bool
) -> Iterator[coordinator_pb2.Event]:
    request = coordinator_pb2.EventsRequest(follow=follow, after=after)
    timeout = FOLLOW_TIMEOUT if follow else rpc.DESCRIBE_TIMEOUT
    yield from stub.Events(request, timeout=timeout)


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they happen.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (schema pomona.event/v1).")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only events after SEQ.")
@coordinator_options
def events_command(
    follow: bool, as_json: bool, after: int, coordinator: str, config_path: Path | None
) -> None:
    """The cluster's event log: nodes joined, lost and returned, plans, loads, failures."""
    stub = _stub(coordinator, config_path)
    last, connected = after, False
    try:
        while True:
            try:
                for event in _events(stub, last, follow):
                    connected = True
                    last = max(last, event.seq)
                    if as_json:
                        click.echo(json.dumps(event_json(event), separators=(",", ":")))
                    else:
                        click.echo(event_line(event))
                    sys.stdout.flush()
                if not follow:
                    return
            except grpc.RpcError as e:
                # A followed stream outlives its deadline and coordinator restarts; a
                # first connection that fails, or a one-off read, is an error.
                code = e.code() if hasattr(e, "code") else None
                if not (follow and connected) or code not in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    raise _fail(e, coordinator, config_path) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(RECONNECT_S)
    except KeyboardInterrupt:
        return
