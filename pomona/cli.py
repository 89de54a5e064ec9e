"""The ``pomona`` command line."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import click
import grpc

from pomona import rpc
from pomona.backends import CHOICES
from pomona.client import (
    check_address,
    coordinator_error,
    coordinator_options,
    coordinator_stub,
)
from pomona.config import (
    DEFAULT_CLUSTER,
    DEFAULT_CONTEXT,
    DEFAULT_COORDINATOR_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_MODEL,
    DEFAULT_WORKER_PORT,
    MAX_CHAT_TEMPLATE_CHARS,
    MAX_DRAFT_TOKENS,
    CoordinatorConfig,
    WorkerConfig,
    default_cache_dir,
    default_model_dirs,
    default_state_dir,
    http_host_for,
)
from pomona.credentials import CONFIG_OPTION, config_for_daemon
from pomona.security import Auth, ClusterConfig
from pomona.v1 import common_pb2, coordinator_pb2


class _Commands(click.Group):
    """The commands kept in modules of their own, imported only when run (or listed):
    a daemon starting (``pomona worker``, ``pomona coordinator``) does without them."""

    MODULES = {
        "init": ("pomona.init_cmd", "init_command"),
        "plan": ("pomona.coordinator.plan_cli", "plan_command"),
        "bench": ("pomona.bench_cmd", "bench_command"),
        "chat": ("pomona.chat", "chat_command"),
        "status": ("pomona.status_cmd", "status_command"),
        "events": ("pomona.status_cmd", "events_command"),
        "models": ("pomona.models_cmd", "models_command"),
        "pull": ("pomona.models_cmd", "pull_command"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.MODULES:
            module, name = self.MODULES[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), name)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="pomona")
def main(verbose: int) -> None:
    """Run one large language model across several machines."""
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("zeroconf").setLevel(logging.WARNING)


def _run_until_signal(make: object) -> None:
    """Run ``make(stop_event)`` until SIGINT/SIGTERM sets the event."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await make(stop)  # type: ignore[operator]

    try:
        asyncio.run(runner())
    except OSError as e:
        raise click.ClickException(str(e)) from e


HTTP_PORT_OPTION = click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_HTTP_PORT,
    show_default=True,
    help="Port of the OpenAI-compatible HTTP API and /metrics (0: off).",
)

CHAT_TEMPLATE_OPTION = click.option(
    "--chat-template",
    "chat_template_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Jinja chat template file replacing the model's own. Without one, a model that "
    "has none gets mlx_lm.server's plain 'USER: ... ASSISTANT:' format.",
)


def check_draft_option(draft_model: str, parallel: str) -> None:
    if draft_model and parallel == "tensor":
        raise click.BadParameter(
            "speculative decoding runs on pipelines only: drop --parallel tensor or --draft-model",
            param_hint="--draft-model",
        )


DRAFT_MODEL_OPTION = click.option(
    "--draft-model",
    default="",
    help="Speculative decoding: a small model with the same tokenizer that drafts tokens on "
    "the head worker (which must hold it); the pipeline verifies several in one pass.",
)
NUM_DRAFT_TOKENS_OPTION = click.option(
    "--num-draft-tokens",
    type=click.IntRange(1, MAX_DRAFT_TOKENS),
    default=4,
    show_default=True,
    help="The most tokens the draft model proposes per step (fewer while few are accepted).",
)

PROMPT_CACHE_OPTION = click.option(
    "--prompt-cache-gb",
    type=click.FloatRange(0, 4096),
    default=None,
    help="GB each worker keeps of finished requests' KV, so a prompt that repeats one's "
    "start (a chat's next turn) prefills only the rest; 0: off. [default: the planner's, "
    "half the memory left after weights and the planned KV cache, at most 8 GB]",
)


def read_chat_template(path: Path | None) -> str:
    """The text of a --chat-template file ("" without one); a bad file is a one-line error."""
    if path is None:
        return ""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"cannot read --chat-template {path}: {e}") from None
    if not text.strip():
        raise click.ClickException(f"--chat-template {path} is empty")
    if len(text) > MAX_CHAT_TEMPLATE_CHARS:
        raise click.ClickException(
            f"--chat-template {path} is over {MAX_CHAT_TEMPLATE_CHARS} characters"
        )
    return text


BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(CHOICES),
    default="auto",
    show_default=True,
    help="MLX backend of the group. auto: jaccl when RDMA joins every pair of workers, "
    "jaccl-ring when Thunderbolt cables only form a ring, nccl when every worker runs "
    "on CUDA, else ring (TCP). One that cannot form falls back to ring.",
)

PARALLEL_OPTION = click.option(
    "--parallel",
    type=click.Choice(("auto", "pipeline", "tensor")),
    default="auto",
    show_default=True,
    help="How the model is split. pipeline: a range of layers per worker; tensor: a "
    "slice of every layer on every worker (mlx-lm's shard(); two collectives per layer, "
    "so it pays on RDMA links); auto: tensor where the planner predicts it faster and "
    "the model can be sharded, else pipeline.",
)


def check_parallel(parallel: str, layers: str | None) -> None:
    if parallel == "tensor" and layers:
        raise click.ClickException(
            "--layers splits layers between workers, which --parallel tensor does not: "
            "drop one of them"
        )


INSECURE_OPTION = click.option(
    "--insecure",
    is_flag=True,
    help="Run without the cluster secret: anyone on the network can control this daemon.",
)


@main.command()
@click.option("--port", default=DEFAULT_WORKER_PORT, show_default=True, help="gRPC port.")
@click.option("--ring-port", default=0, help="MLX ring port [default: PORT+1].")
@click.option(
    "--runner-port", default=0, help="Port of a head runner's request API [default: PORT+2]."
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--name", default=socket.gethostname().split(".")[0], help="Name shown in the cluster."
)
@click.option("--cluster", default=None, help="Cluster to join [default: the configuration's].")
@click.option("--address", "addresses", multiple=True, help="Address to advertise (repeatable).")
@click.option("--mdns-interface", "mdns", multiple=True, help="Interface address for Bonjour.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="Node id, logs.")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(path_type=Path))
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where stage folders fetched from other workers go [default: ~/.cache/pomona/models].",
)
@click.option(
    "--cache-max-gb",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Evict least recently used stage folders beyond this many GB [default: no limit].",
)
@click.option(
    "--max-memory",
    type=click.FloatRange(min=0),
    default=0.0,
    help="GB of memory to offer to models at most [default: all the GPU may use].",
)
@click.option(
    "--spare-runner/--no-spare-runner",
    default=True,
    show_default=True,
    help="Keep a runner process with MLX imported for the next load, and import mlx-lm "
    "in the daemon at start (faster first plans, loads and re-forms).",
)
@CONFIG_OPTION
@INSECURE_OPTION
@click.option(
    "--allow-remote-code",
    is_flag=True,
    help="Let models run Python code they ship (auto_map / model_file). Off by default.",
)
def worker(
    port: int,
    ring_port: int,
    runner_port: int,
    host: str,
    name: str,
    cluster: str | None,
    addresses: tuple[str, ...],
    mdns: tuple[str, ...],
    state_dir: Path | None,
    model_dirs: tuple[Path, ...],
    cache_dir: Path | None,
    cache_max_gb: float,
    max_memory: float,
    spare_runner: bool,
    config_path: Path | None,
    insecure: bool,
    allow_remote_code: bool,
) -> None:
    """Run the worker daemon of this machine."""
    from pomona.worker.daemon import serve
    from pomona.worker.runs_dir import prune_runs, runs_dir

    cluster_config, config_file = config_for_daemon(config_path, insecure)
    config = WorkerConfig(
        name=name,
        cluster=_cluster_name(cluster, cluster_config),
        auth=Auth(cluster_config.secrets if cluster_config else None),
        cluster_config=config_file,
        allow_remote_code=allow_remote_code,
        host=host,
        port=port,
        ring_port=ring_port,
        runner_port=runner_port,
        addresses=addresses,
        mdns_interfaces=mdns,
        state_dir=state_dir or default_state_dir() / "worker",
        model_dirs=model_dirs
        or (cluster_config.model_dirs if cluster_config else ())
        or default_model_dirs(),
        max_memory_bytes=int(max_memory * 1e9),
        cache_dir=cache_dir or default_cache_dir(),
        cache_max_bytes=int(cache_max_gb * 1e9),
        spare_runner=spare_runner,
    )
    prune_runs(runs_dir(config.state_dir))  # logs of loads before a restart
    _run_until_signal(lambda stop: serve(config, stop=stop))


def _cluster_name(given: str | None, config: ClusterConfig | None) -> str:
    if config is None:
        return given or DEFAULT_CLUSTER
    if given and given != config.cluster:
        raise click.BadParameter(
            f"the configuration is for cluster {config.cluster!r}, not {given!r}",
            param_hint="--cluster",
        )
    return config.cluster


def _parse_layers(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter("give layers per worker as numbers, e.g. 3,5") from None


@main.command()
@click.option("--port", default=DEFAULT_COORDINATOR_PORT, show_default=True, help="gRPC port.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to serve.")
@click.option("--cluster", default=None, help="Cluster to manage [default: the configuration's].")
@click.option("--worker", "seeds", multiple=True, help="HOST:PORT of a worker (repeatable).")
@click.option("--min-workers", default=1, show_default=True, help="Workers to wait for.")
@click.option("--layers", default=None, help="Layers per worker in ring order, e.g. 3,5.")
@click.option("--mdns-interface", "mdns", multiple=True, help="Interface address for Bonjour.")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 64),
    default=16,
    show_default=True,
    help="Requests decoded together.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Requests waiting at most; more get 'queue full'.",
)
@click.option(
    "--prefill-step",
    type=click.IntRange(16, 65536),
    default=None,
    help="Prompt tokens per prefill chunk [default: 512; 2048 when every worker "
    "runs on one GPU, where stages cannot prefill at once].",
)
@click.option(
    "--objective",
    type=click.Choice(["latency", "throughput"]),
    default="latency",
    show_default=True,
    help="latency: fewest, fastest workers that fit; throughput: every worker.",
)
@click.option(
    "--context",
    type=click.IntRange(16, 1 << 22),
    default=DEFAULT_CONTEXT,
    show_default=True,
    help="Longest prompt + output, in tokens (capped by the model's).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=4,
    show_default=True,
    help="Sequences of --context tokens the plan reserves KV cache for.",
)
@HTTP_PORT_OPTION
@click.option(
    "--api-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File holding the HTTP API's Bearer key (or set POMONA_API_KEY).",
)
@click.option(
    "--insecure-http",
    is_flag=True,
    help="Serve the HTTP API on --host without an API key (otherwise it stays on loopback).",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(0.5, 600),
    default=5.0,
    show_default=True,
    help="Seconds without heartbeats before a worker is probed and, if silent, lost.",
)
@click.option(
    "--retry-timeout",
    type=click.FloatRange(0, 3600),
    default=120.0,
    show_default=True,
    help="Seconds a request with no token yet waits for a broken pipeline to re-form.",
)
@click.option(
    "--state-dir", type=click.Path(path_type=Path), default=None, help="Event log directory."
)
@click.option(
    "--model-dir",
    "model_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Serve the models in this folder (and the Hugging Face cache) to workers that "
    "lack them (repeatable).",
)
@CHAT_TEMPLATE_OPTION
@PROMPT_CACHE_OPTION
@DRAFT_MODEL_OPTION
@NUM_DRAFT_TOKENS_OPTION
@BACKEND_OPTION
@PARALLEL_OPTION
@CONFIG_OPTION
@INSECURE_OPTION
def coordinator(
    port: int,
    host: str,
    model: str,
    cluster: str,
    seeds: tuple[str, ...],
    min_workers: int,
    layers: str | None,
    mdns: tuple[str, ...],
    max_batch: int,
    max_queue: int,
    prefill_step: int | None,
    objective: str,
    context: int,
    concurrency: int,
    http_port: int,
    api_key_file: Path | None,
    insecure_http: bool,
    heartbeat_timeout: float,
    retry_timeout: float,
    state_dir: Path | None,
    model_dirs: tuple[Path, ...],
    chat_template_file: Path | None,
    prompt_cache_gb: float | None,
    draft_model: str,
    num_draft_tokens: int,
    backend: str,
    parallel: str,
    config_path: Path | None,
    insecure: bool,
) -> None:
    """Run the coordinator: discover workers, place the model, serve requests."""
    from pomona.coordinator.server import serve

    for seed in seeds:
        check_address(seed, "--worker")
    for folder in model_dirs:
        if not folder.is_dir():
            raise click.BadParameter(f"{folder} is not a folder", param_hint="--model-dir")
    split = _parse_layers(layers)
    check_parallel(parallel, layers)
    check_draft_option(draft_model, parallel)
    chat_template = read_chat_template(chat_template_file)
    cluster_config, _ = config_for_daemon(config_path, insecure)
    api_key = os.environ.get("POMONA_API_KEY", "") or (
        cluster_config.api_key if cluster_config and cluster_config.api_key else ""
    )
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except OSError as e:
            raise click.ClickException(f"cannot read --api-key-file: {e.strerror}") from None
        if not api_key:
            raise click.ClickException(f"{api_key_file} is empty")
    config = CoordinatorConfig(
        cluster=_cluster_name(cluster, cluster_config),
        auth=Auth(cluster_config.secrets if cluster_config else None),
        host=host,
        port=port,
        model=model,
        seeds=seeds,
        min_workers=max(1, min_workers),
        layers=split,
        mdns_interfaces=mdns,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_step=prefill_step or 0,
        prompt_cache_gb=prompt_cache_gb,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        chat_template=chat_template,
        objective=objective,
        backend=backend,
        parallel=parallel,
        context=context,
        concurrency=concurrency,
        http_port=http_port,
        http_host=http_host_for(host, api_key, insecure_http),
        api_key=api_key,
        heartbeat_timeout=heartbeat_timeout,
        retry_timeout=retry_timeout,
        state_dir=state_dir or default_state_dir() / "coordinator",
        model_dirs=tuple(d.resolve() for d in model_dirs),
    )
    _run_until_signal(lambda stop: serve(config, stop=stop))


@main.command()
@coordinator_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def nodes(coordinator: str, config_path: Path | None, as_json: bool) -> None:
    """List the cluster's workers and what each holds."""
    from pomona.display import print_nodes

    try:
        reply = coordinator_stub(coordinator, config_path).ListNodes(
            coordinator_pb2.ListNodesRequest(), timeout=rpc.DESCRIBE_TIMEOUT
        )
    except grpc.RpcError as e:
        raise click.ClickException(coordinator_error(e, coordinator, config_path)) from None
    print_nodes(reply, as_json)


@main.command()
@click.argument("prompt")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@coordinator_options
def generate(
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: tuple[str, ...],
    coordinator: str,
    config_path: Path | None,
) -> None:
    """Generate text from PROMPT, streamed as it is produced."""
    sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    request = common_pb2.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=sampling, stop=list(stop)
    )
    written = False
    try:
        for chunk in coordinator_stub(coordinator, config_path).Generate(
            request, timeout=rpc.GENERATE_TIMEOUT
        ):
            if chunk.text:
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
                written = True
    except grpc.RpcError as e:
        if written:  # the error goes on a line of its own
            click.echo()
        raise click.ClickException(coordinator_error(e, coordinator, config_path)) from None
    except KeyboardInterrupt:
        raise click.Abort() from None
    click.echo()


@main.command()
@click.option(
    "--local",
    "count",
    type=click.IntRange(1, 16),
    required=True,
    help="Start this many workers on this machine.",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to serve.")
@click.option(
    "--port", default=DEFAULT_COORDINATOR_PORT, show_default=True, help="Coordinator gRPC port."
)
@HTTP_PORT_OPTION
@click.option("--layers", default=None, help="Layers per worker, e.g. 3,5.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for ready.")
@CHAT_TEMPLATE_OPTION
@PROMPT_CACHE_OPTION
@DRAFT_MODEL_OPTION
@NUM_DRAFT_TOKENS_OPTION
@BACKEND_OPTION
@PARALLEL_OPTION
def up(
    count: int,
    model: str,
    port: int,
    http_port: int,
    layers: str | None,
    timeout: float,
    chat_template_file: Path | None,
    prompt_cache_gb: float | None,
    draft_model: str,
    num_draft_tokens: int,
    backend: str,
    parallel: str,
) -> None:
    """Start a cluster of local workers and a coordinator on this machine."""
    from pomona.local import LocalCluster

    _parse_layers(layers)
    check_parallel(parallel, layers)
    check_draft_option(draft_model, parallel)
    read_chat_template(chat_template_file)  # a bad file fails here, not in the coordinator
    cluster = LocalCluster(
        count,
        model,
        port,
        layers,
        state_dir=default_state_dir() / "local",
        http_port=http_port,
        chat_template=chat_template_file.resolve() if chat_template_file else None,
        backend=backend,
        prompt_cache_gb=prompt_cache_gb,
        parallel=parallel,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    )
    sys.exit(cluster.run(timeout))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
