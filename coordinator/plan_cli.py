"""`pomona plan`: preview where a model's layers would go, before loading anything.

JSON output (`--json`) is the plan as one object:

    model        {name, model_type, precision, num_layers, params, active_params,
                  weights_bytes, kv_bytes_per_token}
    context_length, concurrency, objective, prompt_tokens
    backend      "ring", "jaccl", "jaccl-ring" or "nccl" (what --backend would use)
    backend_reason  why: RDMA between every pair, only a ring of cables, CUDA, or none
    stages       [{node_id, name, chip, start_layer, end_layer (exclusive), num_layers,
                   weights_bytes, kv_bytes, activation_bytes, budget_bytes,
                   free_after_load_bytes, holds_embedding, holds_head, bandwidth_gbs,
                   bandwidth_assumed, gpu_cores, gpu_cores_assumed, decode_seconds,
                   share_of_time}]
    decode_tokens_per_s (per stream), aggregate_tokens_per_s, ttft_s, network_seconds
    formula, notes (every input that was assumed rather than given, among others)
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path
from typing import Any, cast

import click
from rich import box
from rich.console import Console
from rich.table import Table

from pomona.backends import CHOICES
from pomona.config import DEFAULT_CONTEXT
from pomona.coordinator.backend_choice import (
    NodeFacts,
    choose_backend,
    described_facts,
    facts_of,
)
from pomona.coordinator.nodes_file import load_links, load_nodes_file, load_rdma_cables
from pomona.coordinator.parallel import PARALLEL_CHOICES, Comparison, compare_parallel
from pomona.coordinator.planner import (
    DEFAULT_LINK,
    OBJECTIVES,
    Link,
    NodeSpec,
    Objective,
    Plan,
    plan,
)
from pomona.credentials import CONFIG_OPTION
from pomona.model_profile import ModelProfile

GIB = 2**30
QUANT_GROUP_SIZE = 64


def bundled_config_dirs() -> list[Path]:
    """Folders of real model configs that MODEL may name (e.g. "llama-3.1-70b").

    They ship inside the package (package data), so an installed wheel finds them.
    """
    return [Path(str(resources.files("pomona") / "model_configs"))]


def _bundled_names() -> list[str]:
    return sorted(p.stem for d in bundled_config_dirs() if d.is_dir() for p in d.glob("*.json"))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.ClickException(f"cannot read {path} as a JSON config: {e}") from e
    if not isinstance(config, dict):
        raise click.ClickException(f"{path} is not a config.json object")
    return config


def load_profile(model: str, bits: int | None = None) -> ModelProfile:
    """MODEL as a model folder, a config.json path, or a bundled config's name."""
    path = Path(model).expanduser()
    if path.is_dir() and any(path.glob("model*.safetensors")):
        if bits is not None:
            raise click.ClickException(
                "--bits plans a quantized variant of a config; this folder's weights are "
                f"already what they are: pass {path / 'config.json'} to plan from the config"
            )
        return ModelProfile.from_model_dir(path)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise click.ClickException(f"{model} has neither safetensors nor a config.json")
    if not path.is_file():
        found = [d / f"{model}.json" for d in bundled_config_dirs()]
        path = next((p for p in found if p.is_file()), path)
    if not path.is_file():
        known = ", ".join(_bundled_names()) or "none found"
        raise click.ClickException(
            f"{model!r} is not a model folder, a config.json, or a known config ({known})"
        )
    config = _read_config(path)
    if bits is not None:
        config["quantization"] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
    name = path.parent.name if path.stem == "config" else path.stem
    return ModelProfile.from_config(config, name=name if bits is None else f"{name}-{bits}bit")


def _load_nodes_from_coordinator(
    address: str, config_path: Path | None = None
) -> tuple[list[NodeSpec], dict[str, NodeFacts], list[Link]]:
    """The workers a running coordinator knows, as the planner and the backend choice
    see them (facts by node id), and the links it measured between them."""
    import grpc

    from pomona import rpc
    from pomona.client import coordinator_error
    from pomona.coordinator.links import links_from_proto
    from pomona.coordinator.placement import node_spec
    from pomona.credentials import client_auth
    from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

    stub = coordinator_pb2_grpc.CoordinatorStub(
        rpc.channel(address, client_auth(config_path, address))
    )
    try:
        reply = stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=rpc.DESCRIBE_TIMEOUT)
    except grpc.RpcError as e:
        raise click.ClickException(coordinator_error(e, address, config_path)) from None
    nodes = [
        node_spec(n.node_id, n.name, n.hardware, n.address)
        for n in reply.nodes
        if n.state != coordinator_pb2.NODE_STATE_LOST
    ]
    if not nodes:
        raise click.ClickException(f"the coordinator at {address} knows no workers yet")
    facts = {n.node_id: facts_of(n.name, n.backend_facts) for n in reply.nodes}
    return nodes, facts, links_from_proto(reply.links)


def link_lines(result: Plan, links: list[Link]) -> list[str]:
    """One line per hop of the plan's ring: the link it crosses, measured or assumed."""
    by_pair = {frozenset((link.a, link.b)): link for link in links}
    stages = result.stages
    if len(stages) < 2:
        return []
    lines = []
    for a, b in zip(stages, stages[1:] + stages[:1], strict=True):
        link = by_pair.get(frozenset((a.node_id, b.node_id)))
        if link is None:
            figures = (
                f"assumed {DEFAULT_LINK.latency_ms:g} ms, {DEFAULT_LINK.bandwidth_gbs:g} GB/s "
                f"({DEFAULT_LINK.kind})"
            )
        else:
            figures = f"{link.latency_ms:.3g} ms, {link.bandwidth_gbs:.3g} GB/s ({link.kind})"
        lines.append(f"link {a.name} -> {b.name}: {figures}")
    return lines


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _model_json(profile: ModelProfile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "model_type": profile.model_type,
        "precision": profile.precision,
        "num_layers": profile.num_layers,
        "params": profile.params,
        "active_params": round(profile.active_params),
        "weights_bytes": profile.weight_bytes,
        "kv_bytes_per_token": sum(profile.kv_bytes_per_token_per_layer),
    }


def print_plan(
    result: Plan, profile: ModelProfile, console: Console, backend_reason: str = ""
) -> None:
    table = Table(
        title=(
            f"{result.model} · {result.precision} · {_gib(profile.weight_bytes)} GiB · "
            f"{result.concurrency} x {result.context_length} tokens · {result.objective}"
        ),
        caption="memory in GiB; time: predicted share of each decode step; ?: assumed (see notes)",
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for column in ("node", "chip", "layers"):
        table.add_column(column, no_wrap=True)
    for column in ("weights", "KV", "free after load", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for s in result.stages:
        chip = (s.chip or "unknown").removeprefix("Apple ")
        table.add_row(
            s.name,
            chip + ("?" if s.bandwidth_assumed or s.gpu_cores_assumed else ""),
            f"{s.start_layer}-{s.end_layer - 1} ({s.num_layers})",
            _gib(s.weights_bytes),
            _gib(s.kv_bytes),
            _gib(s.free_after_load_bytes),
            f"{s.share_of_time:.0%}",
        )
    console.print(table)
    first, last = result.stages[0], result.stages[-1]
    holds = (
        f"{first.name} holds the embedding, {last.name} the final norm and lm_head"
        if len(result.stages) > 1
        else f"{first.name} holds the whole model"
    )
    aggregate = (
        f" ({result.aggregate_tokens_per_s:.1f} tok/s over {result.concurrency} streams)"
        if result.concurrency > 1
        else ""
    )
    lines = [
        f"backend: {result.backend}" + (f" ({backend_reason})" if backend_reason else ""),
        holds,
        f"predicted: decode {result.decode_tokens_per_s:.1f} tok/s per stream{aggregate}, "
        f"TTFT {result.ttft_s:.2f} s for a {result.prompt_tokens}-token prompt, "
        f"network {result.network_seconds * 1e3:.1f} ms of each step",
        f"formula: {result.formula}",
        *(f"note: {note}" for note in result.notes),
    ]
    for line in lines:
        console.print(line, highlight=False)


def print_comparison(c: Comparison, console: Console) -> None:
    """Pipeline against tensor parallelism, at the nodes' link class."""
    link = f"{c.link.kind}, {c.link.latency_ms * 1e3:g} µs a message"
    lines = [f"parallel: {c.choice.mode} ({c.choice.reason})"]
    if c.pipeline is not None:
        p = c.pipeline
        lines.append(
            f"  pipeline: {p.decode_tokens_per_s:.1f} tok/s per stream on {len(p.stages)} "
            f"node(s), {p.network_seconds * 1e3:.2f} ms of each step on the links ({link})"
        )
    t = c.tensor
    if t is None:
        lines.append(f"  tensor: not possible: {c.why_not_tensor}")
    else:
        rank = t.ranks[0]
        lines.append(
            f"  tensor: {t.decode_tokens_per_s:.1f} tok/s per stream on {t.world_size} ranks "
            f"({', '.join(r.name for r in t.ranks)}): {t.compute_seconds * 1e3:.2f} ms of reads "
            f"+ {t.collective_seconds * 1e3:.2f} ms of {2 * t.layers + 1} collectives a token "
            f"({link}), TTFT {t.ttft_s:.2f} s"
        )
        lines.append(
            f"  tensor memory per rank: {_gib(rank.weights_bytes)} GiB of weights (a 1/"
            f"{t.world_size} slice of every layer, embedding and head whole), "
            f"{_gib(rank.kv_bytes)} GiB of KV, {_gib(rank.activation_bytes)} GiB of activations"
        )
    for line in lines:
        console.print(line, highlight=False)


@click.command("plan")
@click.argument("model")
@click.option(
    "--context",
    type=click.IntRange(min=1),
    default=None,
    help=f"Context length in tokens [default: {DEFAULT_CONTEXT}, as the coordinator's, or "
    "the model's maximum].",
)
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Prompt length TTFT is predicted for [default: 512, or the context if shorter].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Streams decoded together.",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="latency",
    show_default=True,
    help="latency: fewest, fastest nodes; throughput: every node, balanced.",
)
@click.option(
    "--nodes",
    "nodes_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML or JSON file describing the machines (see docs/planning.md).",
)
@click.option("--coordinator", metavar="HOST:PORT", help="Plan on a running cluster's nodes.")
@click.option(
    "--bits",
    type=click.Choice(["2", "3", "4", "5", "6", "8"]),
    default=None,
    help="Plan a BITS-bit (group 64) variant of a config.",
)
@click.option(
    "--backend",
    type=click.Choice(CHOICES),
    default="auto",
    show_default=True,
    help="The coordinator's --backend: show what it would use, and why.",
)
@click.option(
    "--parallel",
    type=click.Choice(PARALLEL_CHOICES),
    default="auto",
    show_default=True,
    help="The coordinator's --parallel: compare pipeline and tensor, and show the choice.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@CONFIG_OPTION
def plan_command(
    model: str,
    context: int | None,
    prompt_tokens: int | None,
    concurrency: int,
    objective: str,
    nodes_file: Path | None,
    coordinator: str | None,
    bits: str | None,
    backend: str,
    parallel: str,
    as_json: bool,
    config_path: Path | None,
) -> None:
    """Show which node would hold which layers of MODEL, and how fast it would run.

    MODEL is a model folder (config.json + safetensors), a config.json, or the name
    of a bundled config such as llama-3.1-70b.
    """
    if nodes_file is not None and coordinator is not None:
        raise click.ClickException("pass --nodes or --coordinator, not both")
    if nodes_file is None and coordinator is None:
        raise click.ClickException("pass --nodes FILE describing the machines, or --coordinator")
    try:
        if nodes_file is not None:
            nodes = load_nodes_file(nodes_file)
            cables = load_rdma_cables(nodes_file)
            by_name = described_facts([(n.name, n.rdma) for n in nodes], cables)
            facts = {n.node_id: by_name[n.name] for n in nodes}
            links = load_links(nodes_file, nodes)
        else:
            nodes, facts, links = _load_nodes_from_coordinator(str(coordinator), config_path)
        profile = load_profile(model, int(bits) if bits else None)
        length = context or min(DEFAULT_CONTEXT, profile.max_context or DEFAULT_CONTEXT)
        result = plan(
            profile,
            nodes,
            context_length=length,
            concurrency=concurrency,
            objective=cast("Objective", objective),
            prompt_tokens=prompt_tokens,
            links=links,
        )
        comparison = compare_parallel(
            profile,
            nodes,
            parallel,
            links=links,
            context_length=length,
            concurrency=concurrency,
            objective=objective,
            prompt_tokens=prompt_tokens,
        )
        ranks = [r.node_id for r in comparison.tensor.ranks] if comparison.tensor else []
        used = ranks if comparison.choice.mode == "tensor" else [s.node_id for s in result.stages]
        choice = choose_backend(backend, [facts[n] for n in used])
    except ValueError as e:
        raise click.ClickException(" ".join(str(e).split())) from e
    result = replace(result, backend=choice.backend)
    if as_json:
        extra = {
            "backend_reason": choice.reason,
            "model": _model_json(profile),
            "links": [asdict(link) for link in links],
            "parallel": comparison.to_dict(),
        }
        click.echo(json.dumps({**result.to_dict(), **extra}, indent=2))
    else:
        console = Console()
        if comparison.choice.mode == "pipeline":
            print_plan(result, profile, console, choice.reason)
        else:
            console.print(f"backend: {choice.backend} ({choice.reason})", highlight=False)
        for line in link_lines(result, links):
            click.echo(line)
        print_comparison(comparison, console)
