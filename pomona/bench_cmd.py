"""`pomona bench`: TTFT, decode and aggregate tokens/s of a running cluster, each beside
what the planner predicts for the serving plan (see docs/benchmarks.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pomona import rpc
from pomona.bench_view import bench_json, print_bench
from pomona.benchmark import (
    BenchResult,
    BenchSettings,
    Predicted,
    Predictor,
    Streamer,
    run_bench,
)
from pomona.client import coordinator_error, coordinator_options, coordinator_stub
from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

MAX_STREAMS = 1024
# A coordinator asks a worker what the model is once per load: a few seconds at most.
MODEL_INFO_WAIT_S = 15.0


def parse_concurrency(text: str) -> tuple[int, ...]:
    """ "1,4,8,16" -> (1, 4, 8, 16); "" or "none": no sweep."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.ClickException(
            f"--concurrency {text!r}: give stream counts as numbers, e.g. 1,4,8,16"
        ) from None
    if any(not 1 <= n <= MAX_STREAMS for n in counts):
        raise click.ClickException(
            f"--concurrency {text}: stream counts go from 1 to {MAX_STREAMS}"
        )
    return counts


def _serving_status(
    stub: coordinator_pb2_grpc.CoordinatorStub, address: str
) -> coordinator_pb2.StatusReply:
    """The Status of a serving cluster whose model is known, or a one-line error."""
    deadline = time.monotonic() + MODEL_INFO_WAIT_S
    while True:
        reply: coordinator_pb2.StatusReply = stub.Status(
            coordinator_pb2.StatusRequest(), timeout=rpc.DESCRIBE_TIMEOUT
        )
        if not reply.serving:
            raise click.ClickException(
                f"the cluster at {address} is not serving: {reply.problem or 'no plan yet'}"
            )
        if reply.vocab_size > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if reply.vocab_size <= 0:
        raise click.ClickException(
            f"the coordinator at {address} does not say the model's vocabulary "
            "(it may be older than this pomona): cannot build prompts of token ids"
        )
    return reply


def check_context(settings: BenchSettings, max_context: int) -> None:
    """Every request must fit the serving context, or the bench stops before it starts."""
    for what, needed in settings.context_needed():
        if max_context and needed > max_context:
            raise click.ClickException(
                f"{what} needs {needed} tokens of context; the cluster serves {max_context} "
                "at most: ask for a shorter --prompt-tokens or fewer --gen-tokens"
            )


def serving_predictor(status: coordinator_pb2.StatusReply) -> tuple[Predictor, list[str]]:
    """The planner's predictions for the serving plan, and what they assume."""
    from pomona.coordinator.links import links_from_proto
    from pomona.coordinator.memory_fit import resolve_node
    from pomona.coordinator.parallel import is_tensor_layout, predict_tensor
    from pomona.coordinator.placement import node_spec
    from pomona.coordinator.planner import DEFAULT_LINK, predict
    from pomona.model_profile import ModelProfile

    def nothing(prompt: int, context: int, streams: int) -> Predicted | None:
        return None

    if not status.model_profile_json or not status.plan:
        return nothing, ["no predictions: the coordinator did not send the model or its plan"]
    by_id = {n.node.node_id: n.node for n in status.nodes}
    try:
        profile = ModelProfile.from_json(status.model_profile_json)
        stages = [
            (node_spec(s.node_id, s.name, by_id[s.node_id].hardware), s.start_layer, s.end_layer)
            for s in status.plan
        ]
        tensor = is_tensor_layout(profile.num_layers, [(s, e) for _, s, e in stages])
        if not tensor:
            predict(profile, stages, context_length=1, prompt_tokens=1)
    except (KeyError, ValueError) as e:
        return nothing, [f"no predictions: the serving plan cannot be read ({e})"]
    assumed: dict[str, list[str]] = {}  # what was assumed or measured -> the nodes it was for
    for spec, _, _ in stages:
        node = resolve_node(spec)
        guesses = [f"{node.bandwidth_gbs:g} GB/s"] * node.bandwidth_assumed
        guesses += [f"{node.gpu_cores} GPU cores"] * bool(node.cores_assumption)
        if guesses:
            what = f"assume {' and '.join(guesses)} ({spec.chip or 'chip unknown'})"
            assumed.setdefault(what, []).append(spec.name)
        measured = [f"{node.bandwidth_gbs:.3g} GB/s"] * node.bandwidth_measured
        measured += [f"{node.flops / 1e12:.3g} TFLOPS"] * node.flops_measured
        if measured:
            what = f"use what the worker measured: {', '.join(measured)}"
            assumed.setdefault(what, []).append(spec.name)
    notes = [
        f"predictions for {', '.join(names)} {what}: see `pomona plan --coordinator`"
        for what, names in assumed.items()
    ]

    links = links_from_proto(status.links)  # hops at what the coordinator measured
    if not links and len(stages) > 1:
        notes.append(
            f"links not measured: predictions assume {DEFAULT_LINK.latency_ms:g} ms and "
            f"{DEFAULT_LINK.bandwidth_gbs:g} GB/s a hop ({DEFAULT_LINK.kind})"
        )

    def predictor(prompt: int, context: int, streams: int) -> Predicted | None:
        if tensor:
            p = predict_tensor(
                profile,
                [spec for spec, _, _ in stages],
                context_length=context,
                prompt_tokens=prompt,
                concurrency=streams,
                links=links,
            )
        else:
            p = predict(
                profile,
                stages,
                context_length=context,
                prompt_tokens=prompt,
                concurrency=streams,
                links=links,
            )
        return Predicted(p.ttft_s, p.decode_tokens_per_s, p.aggregate_tokens_per_s)

    return predictor, notes


@click.command("bench")
@click.option(
    "--prompt-tokens",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Prompt length whose TTFT is measured.",
)
@click.option(
    "--gen-tokens",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Tokens generated per request; decode tok/s is measured over them.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="Requests (or rounds of streams) per figure: min, median, max.",
)
@click.option(
    "--concurrency",
    default="1,4,8,16",
    show_default=True,
    help="Stream counts of the sweep, comma-separated ('none': no sweep).",
)
@click.option(
    "--sweep-prompt-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Prompt length of each stream of the sweep.",
)
@click.option(
    "--second-turn",
    is_flag=True,
    help="Also time a prompt, then the same prompt + 64 tokens (a chat's next turn).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the random prompt token ids.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema pomona.bench/v1).")
@coordinator_options
def bench_command(
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    concurrency: str,
    sweep_prompt_tokens: int,
    second_turn: bool,
    seed: int,
    as_json: bool,
    coordinator: str,
    config_path: Path | None,
) -> None:
    """Measure a running cluster: TTFT and decode tok/s by Apple's protocol (a
    --prompt-tokens prompt, then --gen-tokens greedy tokens), aggregate tok/s of
    concurrent streams, and, with --second-turn, a chat's next turn; each beside the
    planner's prediction for the serving plan."""
    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        repeats=repeats,
        concurrency=parse_concurrency(concurrency),
        sweep_prompt_tokens=sweep_prompt_tokens,
        second_turn=second_turn,
        seed=seed,
    )
    try:
        stub = coordinator_stub(coordinator, config_path)
    except click.BadParameter as e:
        raise click.ClickException(f"--coordinator: {coordinator!r} is not HOST:PORT") from e
    streamer = Streamer(stub, seed)
    try:
        status = _serving_status(stub, coordinator)
        check_context(settings, status.max_context)
        predictor, notes = serving_predictor(status)
        result = _measure(streamer, settings, status.vocab_size, predictor)
    except grpc.RpcError as e:
        raise click.ClickException(coordinator_error(e, coordinator, config_path)) from None
    except KeyboardInterrupt:
        streamer.cancel()
        raise click.Abort() from None
    header: dict[str, Any] = {
        "coordinator": coordinator,
        "cluster": status.cluster,
        "model": status.model,
        "load_id": status.load_id,
        "stages": [
            {
                "node_id": s.node_id,
                "name": s.name,
                "start_layer": s.start_layer,
                "end_layer": s.end_layer,
            }
            for s in status.plan
        ],
    }
    if as_json:
        click.echo(json.dumps(bench_json(result, header, notes), indent=2))
    else:
        print_bench(result, header, notes, Console())


def _measure(
    streamer: Streamer, settings: BenchSettings, vocab_size: int, predictor: Predictor
) -> BenchResult:
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as progress:
        task = progress.add_task("starting", total=settings.steps)
        first = True

        def step(what: str) -> None:
            nonlocal first
            progress.update(task, description=what, advance=0 if first else 1)
            first = False

        result = run_bench(streamer, settings, vocab_size, predictor, step)
        progress.update(task, advance=1)
    return result
