"""`pomona models` and `pomona pull`: which models the cluster holds, and staging one."""

from __future__ import annotations

import json
from pathlib import Path

import click
import grpc
from google.protobuf.json_format import MessageToDict

from pomona import rpc
from pomona.client import coordinator_options, coordinator_stub
from pomona.units import format_bytes
from pomona.v1 import coordinator_pb2, transfer_pb2

MODELS_SCHEMA = "pomona.models/v1"
PULL_TIMEOUT = 24 * 3600.0


def _ranges(holder: coordinator_pb2.ModelHolder) -> str:
    if holder.complete:
        return "whole"
    return ", ".join(f"layers {s.start_layer}-{s.end_layer - 1}" for s in holder.stages)


def models_text(reply: coordinator_pb2.ClusterModels) -> list[str]:
    """`tiny  40.0 MiB  mini-1 (whole), mini-2 (layers 2-3, 12.0 MiB)` per model."""
    if not reply.models:
        return ["no worker holds a model: put one in a worker's --model-dir"]
    lines = []
    for m in reply.models:
        size = format_bytes(m.size_bytes) if m.size_bytes else "partial only"
        holders = ", ".join(
            f"{h.name} ({_ranges(h)}" + ("" if h.complete else f", {format_bytes(h.bytes)}") + ")"
            for h in m.holders
        )
        lines.append(f"{m.model}  {size}  {holders}")
    return lines


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help=f"JSON (schema {MODELS_SCHEMA}).")
@coordinator_options
def models_command(as_json: bool, coordinator: str, config_path: Path | None) -> None:
    """The models the cluster can serve: which workers hold each, whole or in part."""
    stub = coordinator_stub(coordinator, config_path)
    try:
        reply = stub.ListModels(transfer_pb2.ListModelsRequest(), timeout=rpc.INSPECT_TIMEOUT)
    except grpc.RpcError as e:
        raise click.ClickException(rpc.describe_error(e, coordinator)) from None
    if as_json:
        body = MessageToDict(
            reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        click.echo(json.dumps({"schema": MODELS_SCHEMA, **body}, indent=2))
        return
    for line in models_text(reply):
        click.echo(line)


@click.command("pull")
@click.argument("model")
@click.option(
    "--plan-for",
    "workers",
    type=click.IntRange(min=0),
    default=0,
    help="Plan for this many workers [default: every worker].",
)
@coordinator_options
def pull_command(model: str, workers: int, coordinator: str, config_path: Path | None) -> None:
    """Give every worker the stage of MODEL it would hold, ahead of serving."""
    stub = coordinator_stub(coordinator, config_path)
    request = coordinator_pb2.PullRequest(model=model, workers=workers)
    last = None
    try:
        for progress in stub.Pull(request, timeout=PULL_TIMEOUT):
            if last is None:
                for s in progress.plan:
                    click.echo(
                        f"{s.name}: layers {s.start_layer}-{s.end_layer - 1} "
                        f"({format_bytes(s.weights_bytes)})"
                    )
            line = pull_line(progress)
            if line:
                click.echo(line)
            last = progress
    except grpc.RpcError as e:
        raise click.ClickException(rpc.describe_error(e, coordinator)) from None
    if last is None or not last.done:
        raise click.ClickException("the pull ended before every stage was held")
    click.echo(f"{model}: every worker holds its stage")


def pull_line(progress: coordinator_pb2.PullProgress) -> str:
    parts = []
    for t in progress.transfers:
        p = t.progress
        if p.state == "fetching":
            eta = f", {p.eta_s:.0f} s left" if p.HasField("eta_s") else ""
            parts.append(
                f"{t.name} {format_bytes(p.bytes_done)}/{format_bytes(p.bytes_total)} "
                f"{format_bytes(p.bytes_per_s)}/s{eta}"
            )
        elif p.state == "done" and progress.done:
            parts.append(f"{t.name} fetched {format_bytes(p.bytes_received)}")
        elif p.state == "held" and progress.done:
            parts.append(f"{t.name} held")
    return "; ".join(parts)
