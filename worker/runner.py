"""The runner: one process per loaded shard, started by the worker daemon.

It loads its layer range, joins the MLX distributed group from the
environment its daemon gave it (``pomona.backends``: ``MLX_RANK``, ``MLX_HOSTFILE`` for
the ring, ``MLX_IBV_DEVICES`` and ``MLX_JACCL_COORDINATOR`` for JACCL),
and runs lockstep generation. It talks to its daemon through its standard
streams: JSON events on stdout (loading progress, ready, failed), commands on
stdin (``wake``, ``stop``). When stdin closes — the daemon is gone — it exits.

Run as ``python -m pomona.worker.runner SPEC_JSON``, or as a spare started
ahead of its load, ``python -m pomona.worker.runner --warm`` (warm_runner).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pomona.orphans import die_with_parent
from pomona.worker.group import GroupError, in_background, join_group, wait_for_listeners
from pomona.worker.warm_runner import WARM_FLAG

log = logging.getLogger("pomona.worker.runner")

MIN_HIT_TOKENS = 32  # the shortest shared prefix the prefix cache restores


@dataclass(frozen=True)
class RunnerSpec:
    load_id: str
    model_path: str
    start: int
    end: int
    rank: int
    world_size: int
    backend: str
    # Worker daemon addresses by rank: the head wakes the others through them.
    workers: tuple[str, ...]
    # Where the head serves Generate (host and port to bind; 0: any free port).
    serve_host: str = "127.0.0.1"
    serve_port: int = 0
    advertise_host: str = "127.0.0.1"
    # This worker's node id and every rank's, in rank order: calls are signed
    # for the one node they go to.
    node_id: str = ""
    node_ids: tuple[str, ...] = ()
    max_context: int = 0
    # Prompt tokens per prefill chunk; 0: chosen here (``prefill_step_for``).
    prefill_step: int = 0
    max_queue: int = 64
    max_batch: int = 16
    # The cluster configuration file (never the secret itself: the spec is
    # on the command line), for the head's server and its calls to peers.
    cluster_config: str = ""
    allow_remote_code: bool = False
    # Replaces the model's chat template when set.
    chat_template: str = ""
    # A rank stuck inside one step has lost a peer that froze (a dead peer
    # raises at once); the runner exits so the group is re-formed. The bound
    # follows the pipeline's measured pace (lockstep.StepWatch); this one
    # holds until a first step has been measured.
    step_timeout: float = 60.0
    # Seconds a backend other than the ring may take to form its group.
    join_timeout: float = 60.0
    # Seconds the ring's last rank waits for the other ranks to load (group.py):
    # they may be fetching their stages (as long as the daemon's group_timeout).
    peers_timeout: float = 3600.0
    # Prefix KV cache: bytes per stage (0: off) and the largest stage's KV
    # bytes per token (see ``prefix_cache``).
    prompt_cache_bytes: int = 0
    prompt_cache_token_bytes: int = 0
    # "pipeline": layers [start, end); "tensor": a slice of every layer.
    parallel: str = "pipeline"
    # Speculative decoding (head runner): the draft model's folder and name,
    # and the most tokens it drafts per step.
    model: str = ""  # the target's name, as the coordinator gave it
    draft_model_path: str = ""
    draft_model: str = ""
    num_draft_tokens: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunnerSpec:
        data = json.loads(text)
        data["workers"] = tuple(data["workers"])
        data["node_ids"] = tuple(data.get("node_ids", ()))
        return cls(**data)


_emit_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the daemon."""
    with _emit_lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("POMONA_LOG_LEVEL", "INFO"),
        format="%(asctime)s runner %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    die_with_parent(signal.SIGKILL)
    if argv[1:2] == [WARM_FLAG]:
        started = _wait_for_load()
        if started is None:
            return 0  # the daemon went away, or stopped the spare
        spec = started
    else:
        spec = RunnerSpec.from_json(argv[1])
    try:
        return _run(spec)
    except Exception as e:  # the daemon reports it; the coordinator re-plans
        log.exception("runner failed")
        group = isinstance(e, GroupError)
        emit("failed", error=str(e) if group else f"{type(e).__name__}: {e}", group=group)
        return 1


def _wait_for_load() -> RunnerSpec | None:
    """A spare runner (``--warm``): import what every load needs, then wait for one.

    The daemon writes one line, ``{"cmd": "start", "spec": ..., "env": {...}}``;
    the environment (the group's variables and files, pomona.backends) is set
    before anything reads it. The imports are the runner's slow part.
    """
    import mlx.core  # noqa: F401
    import mlx_lm.utils  # noqa: F401

    import pomona.worker.lockstep  # noqa: F401
    import pomona.worker.runner_service  # noqa: F401 - the head's server, and its auth
    import pomona.worker.scheduler  # noqa: F401
    import pomona.worker.shard  # noqa: F401
    import pomona.worker.tensor  # noqa: F401

    emit("warm")
    line = sys.stdin.readline()
    if not line:
        return None
    command = json.loads(line)
    if command.get("cmd") != "start":
        return None
    os.environ.update({str(k): str(v) for k, v in command.get("env", {}).items()})
    return RunnerSpec.from_json(command["spec"])


# Prompt tokens per prefill chunk when not set: small chunks let the stages of
# a pipeline of machines prefill one prompt at once (bench_prefill.py: 0.51x
# mlx-lm's time to first token at 256 tokens, 0.57x at 512, on 2 CPU ranks);
# ranks on one GPU cannot compute at once, so there larger chunks, as mlx-lm's,
# cost fewer hand-offs (the H200: 0.88x mlx-lm's pipeline at 2048, 1.20x at 512).
PREFILL_STEP = 512
SHARED_GPU_PREFILL_STEP = 2048


def shares_one_gpu(workers: tuple[str, ...], on_gpu: bool) -> bool:
    """Whether every rank computes on one GPU: all on a GPU, all on one host.

    ``workers``: the ranks' daemon addresses ("host:port"). One rank counts.
    """
    hosts = {w.rsplit(":", 1)[0] for w in workers}
    return on_gpu and len(hosts) <= 1


def prefill_step_for(asked: int, shared_gpu: bool) -> int:
    """The prefill chunk: as asked (--prefill-step), else by where the ranks run."""
    if asked:
        return asked
    return SHARED_GPU_PREFILL_STEP if shared_gpu else PREFILL_STEP


def _run(spec: RunnerSpec) -> int:
    import dataclasses

    import mlx.core as mx

    on_gpu = bool(mx.default_device() == mx.gpu)
    shared_gpu = shares_one_gpu(spec.workers, on_gpu)
    spec = dataclasses.replace(spec, prefill_step=prefill_step_for(spec.prefill_step, shared_gpu))
    if spec.draft_model_path and on_gpu and sys.platform == "linux":
        _attention_for_drafts()

    from pomona.worker.lockstep import StepWatch
    from pomona.worker.shard import StageSpec, load_stage, load_tensor_slice
    from pomona.worker.tensor import make_engine

    tensor = spec.parallel == "tensor"
    stage = StageSpec(spec.start, spec.end, spec.rank, spec.world_size, tensor=tensor)
    began = time.monotonic()
    group = None
    if spec.world_size > 1 and (spec.backend != "ring" or tensor):
        # Before loading: a backend that cannot form fails in seconds, not after the
        # weights; and tensor slices are cut for the group's size and rank.
        emit("state", state="connecting")
        group = join_group(spec.backend, spec.rank, spec.world_size, spec.join_timeout)
    emit("state", state="loading", progress=0.0)
    peers_joining = None
    if group is None and spec.world_size > 1 and spec.rank == spec.world_size - 1:
        # The ring's last rank asks whether the others listen while its weights load.
        peers_joining = in_background(
            functools.partial(
                wait_for_listeners,
                spec.workers,
                spec.node_ids,
                spec.load_id,
                spec.rank,
                spec.cluster_config,
                spec.peers_timeout,
            )
        )

    def progress(p: float) -> None:
        emit("state", state="loading", progress=round(p, 4))

    if tensor:
        shard = load_tensor_slice(
            Path(spec.model_path),
            stage,
            group,
            progress=progress,
            trust_remote_code=spec.allow_remote_code,
        )
    else:
        shard = load_stage(
            Path(spec.model_path),
            stage,
            progress=progress,
            trust_remote_code=spec.allow_remote_code,
        )
    emit(
        "loaded",
        files=shard.files,
        weights_bytes=shard.weights_bytes,
        active_bytes=mx.get_active_memory(),
    )
    loaded = time.monotonic()
    if spec.world_size > 1:
        if peers_joining is not None:
            peers_joining()
        emit("state", state="connecting")
        if group is None:
            group = mx.distributed.init(backend=spec.backend, strict=True)
        if (group.rank(), group.size()) != (spec.rank, spec.world_size):
            raise RuntimeError(
                f"joined as rank {group.rank()} of {group.size()}, "
                f"expected {spec.rank} of {spec.world_size}"
            )
        mx.eval(mx.distributed.all_sum(mx.ones((1,))))  # everyone is here
    joined = time.monotonic()
    engine = make_engine(shard, StepWatch(first=spec.step_timeout))
    scheduler = _make_scheduler(spec, engine, shared_gpu) if spec.rank == 0 else None
    log.info(
        "rank %d set up in %.2f s: weights %.2f s, group %.2f s, engine %.2f s",
        spec.rank,
        time.monotonic() - began,
        loaded - began,
        joined - loaded,
        time.monotonic() - joined,
    )
    _start_monitor(spec, engine, scheduler)
    if scheduler is not None:
        return _serve_head(spec, engine, scheduler, shard.config)
    emit("ready")
    session = 0
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("cmd") == "wake":
            # A session already run (a replayed or duplicated Wake) would leave
            # this rank spinning in a collective the head never joins.
            if int(command.get("session", 0)) > session:
                session = int(command["session"])
                engine.follower_session()
        elif command.get("cmd") == "stop":
            break
    return 0


def _attention_for_drafts() -> None:
    """On CUDA, verify steps attend without cuDNN (``MLX_CUDA_USE_CUDNN_SDPA=0``).

    MLX's CUDA backend builds a cuDNN graph for each new (query, key) length of
    attention over several tokens, some 50-70 ms each on the H200. A prompt's
    chunks meet a few lengths; verify steps meet a new one every step, so with
    cuDNN a draft made one stream 0.72x as fast as without it, and 0.98x with
    the composed attention. Set before any attention runs; an explicit setting
    in the environment wins. Metal has no such cost.
    """
    if "MLX_CUDA_USE_CUDNN_SDPA" not in os.environ:
        os.environ["MLX_CUDA_USE_CUDNN_SDPA"] = "0"
        log.info("speculative decoding on CUDA: attention without cuDNN graphs")


def _make_scheduler(spec: RunnerSpec, engine: Any, shared_gpu: bool = False) -> Any:
    """The head's scheduler.

    Lanes, one per rank, let the ranks compute at once. Ranks that share one
    GPU cannot, so there every request goes in one lane, whose steps chain: on
    the H200, two lanes of 4 rows gave 0.54x the aggregate tokens/s of
    mlx_lm.server's one batch at 8 streams.
    """
    from mlx_lm.utils import load_tokenizer

    from pomona.worker.scheduler import Scheduler

    can_batch = engine.can_batch()
    lanes = 1 if shared_gpu and can_batch else engine.lane_count

    extra = {"chat_template": spec.chat_template} if spec.chat_template else None
    tokenizer = load_tokenizer(Path(spec.model_path), tokenizer_config_extra=extra)
    scheduler = Scheduler(
        lambda: tokenizer.detokenizer,
        tokenizer.eos_token_ids,
        prefill_step=spec.prefill_step,
        max_queue=spec.max_queue,
        max_batch=spec.max_batch,
        lanes=lanes,
        # A model that cannot batch still serves one request per rank at once.
        rows_per_lane=spec.max_batch if can_batch else 1,
        prefix_cache=_make_prefix_cache(spec, engine),
        # POMONA_CHAINED_STEPS=0 turns the overlap off: for side-by-side benchmarks.
        chain=engine.can_chain and os.environ.get("POMONA_CHAINED_STEPS", "1") != "0",
        drafter=_make_drafter(spec, engine, tokenizer),
    )
    scheduler.tokenizer = tokenizer
    return scheduler


def _make_drafter(spec: RunnerSpec, engine: Any, tokenizer: Any) -> Any:
    """The draft model for speculative decoding, checked against the target, or None."""
    if not spec.draft_model_path:
        return None
    if spec.parallel != "pipeline":
        log.warning("speculative decoding runs on pipelines only: the draft is not used")
        return None
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load

    from pomona.worker.speculative import Drafter, check_draft

    began = time.monotonic()
    draft, draft_tokenizer = load(spec.draft_model_path)[:2]
    check_draft(
        spec.model or Path(spec.model_path).name,
        spec.draft_model or spec.draft_model_path,
        tokenizer,
        draft_tokenizer,
        engine.kinds,
        make_prompt_cache(draft),
    )
    log.info(
        "draft model %s loaded in %.2f s: up to %d drafted tokens per step",
        spec.draft_model or spec.draft_model_path,
        time.monotonic() - began,
        spec.num_draft_tokens,
    )

    def failed(error: str) -> None:
        emit("draft_failed", error=error)

    drafter = Drafter(
        draft,
        spec.num_draft_tokens,
        prefill_step=spec.prefill_step,
        # A test hook: the draft raises after this many proposals.
        fail_after=int(os.environ.get("POMONA_TEST_DRAFT_FAIL_AFTER", "0")),
        on_failure=failed,
    )
    drafter.trace = engine.trace
    return drafter


def _make_prefix_cache(spec: RunnerSpec, engine: Any) -> Any:
    from pomona.worker.prefix_cache import PrefixCache
    from pomona.worker.prefix_kv import prefix_cacheable

    if spec.prompt_cache_bytes <= 0 or spec.prompt_cache_token_bytes <= 0:
        return None
    cacheable, window = prefix_cacheable(engine.kinds)
    if not cacheable:
        log.warning("this model's caches cannot be trimmed: the prefix cache is off")
        return None
    # Sliding-window caches are kept only while shorter than the window. A
    # shorter shared prefix (a BOS token, a chat header) is not worth admitting
    # the prompt alone to restore it.
    return PrefixCache(
        spec.prompt_cache_bytes,
        spec.prompt_cache_token_bytes,
        max_tokens=window,
        min_tokens=MIN_HIT_TOKENS,
    )


def _start_monitor(spec: RunnerSpec, engine: Any, scheduler: Any) -> None:
    """Once a second: report stats to the daemon, and exit if a step hangs."""
    import mlx.core as mx
    import psutil

    process = psutil.Process()

    def loop() -> None:
        last_tokens, last_time = 0, time.monotonic()
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            watch = engine.watch
            if watch.overdue(now) > 0:
                message = (
                    f"rank {spec.rank} waited {watch.budget + watch.overdue(now):.1f} s inside "
                    f"one pipeline step (the pipeline's measured pace allows {watch.budget:.1f} s):"
                    " a peer stopped answering"
                )
                log.error("%s; exiting so the group can be re-formed", message)
                emit("failed", error=message)
                os._exit(3)
            stats: dict[str, Any] = {
                "mlx_active_bytes": mx.get_active_memory(),
                "mlx_peak_bytes": mx.get_peak_memory(),
                "mlx_cache_bytes": mx.get_cache_memory(),
                "rss_bytes": process.memory_info().rss,
            }
            if scheduler is not None:
                tokens = scheduler.tokens_total
                ttfts = list(scheduler.ttfts)
                stats.update(
                    tokens_per_s=(tokens - last_tokens) / (now - last_time),
                    tokens_total=tokens,
                    requests_total=scheduler.requests_total,
                    requests_in_flight=scheduler.in_flight,
                    requests_waiting=scheduler.waiting,
                    ttft_s=sum(ttfts) / len(ttfts) if ttfts else None,
                )
                drafter = scheduler.drafter
                if drafter is not None:
                    stats.update(
                        draft_tokens=drafter.drafted_total,
                        draft_accepted_tokens=drafter.accepted_total,
                        verify_steps=drafter.verifies_total,
                        verify_tokens=drafter.verify_tokens_total,
                        draft_failed=int(bool(drafter.failed)),
                    )
                cache = scheduler.prefix_cache
                if cache is not None:
                    stats.update(
                        prompt_cache_bytes=cache.bytes,
                        prompt_cache_budget_bytes=cache.budget_bytes,
                        prompt_cache_lookups=cache.lookups,
                        prompt_cache_hits=cache.hits,
                        prompt_cache_hit_tokens=cache.hit_tokens,
                    )
                last_tokens, last_time = tokens, now
            emit("stats", **stats)

    threading.Thread(target=loop, daemon=True, name="monitor").start()


def _serve_head(spec: RunnerSpec, engine: Any, scheduler: Any, config: dict[str, Any]) -> int:
    import grpc

    from pomona import rpc
    from pomona.tokens import runner_target
    from pomona.v1 import runner_pb2_grpc, worker_pb2, worker_pb2_grpc
    from pomona.worker.runner_service import RunnerService

    tokenizer = scheduler.tokenizer
    model_context = int(config.get("max_position_embeddings") or 0) or (1 << 20)
    max_context = min(spec.max_context or model_context, model_context)
    vocab_size = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    from pomona.security import Auth

    auth = Auth.load(Path(spec.cluster_config)) if spec.cluster_config else Auth.none()
    # No SO_REUSEPORT: a port another process holds must fail here, loudly.
    server = rpc.server(
        futures.ThreadPoolExecutor(max_workers=256),
        auth,
        target=runner_target(spec.node_id, spec.load_id),
        options=[("grpc.so_reuseport", 0)],
    )
    runner_pb2_grpc.add_RunnerServicer_to_server(
        RunnerService(scheduler, tokenizer, max_context, vocab_size), server
    )
    address = f"{spec.serve_host}:{spec.serve_port}"
    try:
        port = rpc.add_port(server, address, auth)
    except RuntimeError:
        port = 0
    if not port:
        raise RuntimeError(f"cannot listen on {address} for requests: is --runner-port taken?")
    server.start()

    stopping = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if json.loads(line).get("cmd") == "stop":
                break
        stopping.set()
        scheduler.wake()

    threading.Thread(target=watch_stdin, daemon=True, name="stdin").start()
    targets = spec.node_ids or ("",) * spec.world_size
    peers = [
        worker_pb2_grpc.WorkerStub(rpc.channel(w, auth, target))
        for w, target in zip(spec.workers[1:], targets[1:], strict=True)
    ]

    def wake(session: int) -> None:
        """Every other rank enters session number ``session``."""
        calls = [
            p.Wake.future(
                worker_pb2.WakeRequest(load_id=spec.load_id, session=session),
                timeout=rpc.WAKE_TIMEOUT,
            )
            for p in peers
        ]
        for rank, call in enumerate(calls, start=1):
            try:
                call.result()
            except grpc.RpcError as e:
                raise RuntimeError(
                    f"could not wake rank {rank} at {spec.workers[rank]}: {e.details()}"
                ) from e

    session = 0
    if _warm_up_wanted():
        session += 1
        _warm_up(spec, engine, scheduler, lambda: wake(session))
    emit("ready", address=f"{spec.advertise_host}:{port}")
    try:
        while not stopping.is_set():
            if not scheduler.wait_for_work(timeout=1.0):
                continue
            session += 1
            wake(session)
            engine.head_session(scheduler.next_step, scheduler.on_tokens)
    except Exception as e:
        scheduler.fail_all(f"the pipeline failed: {e}")
        raise
    finally:
        server.stop(grace=1.0)
    return 0


def _warm_up_wanted() -> bool:
    """Warm up at load on an accelerator (``POMONA_WARMUP=1|0`` overrides).

    MLX's GPU backends compile a kernel for each new step shape on first use:
    on the H200, the first 4,096-token request took 5.0 s to its first token
    and the next ones 0.3 s. On the CPU there is little to gain, and tests and
    benchmarks there load many times.
    """
    import mlx.core as mx

    wanted = os.environ.get("POMONA_WARMUP", "")
    if wanted:
        return wanted != "0"
    return bool(mx.default_device() == mx.gpu)


def _warm_up(spec: RunnerSpec, engine: Any, scheduler: Any, wake: Callable[[], None]) -> None:
    """One session of the step shapes a request meets first, on every rank."""
    from pomona.worker.lockstep import warm_up_steps

    began = time.monotonic()
    drafter = scheduler.drafter
    widths = range(2, drafter.k_max + 2) if drafter is not None else ()
    if drafter is not None:
        drafter.warm_up(spec.prefill_step)
    wake()
    engine.warm_up(warm_up_steps(spec.prefill_step, widths))
    log.info(
        "warmed up in %.2f s (prefill chunks of %d)", time.monotonic() - began, spec.prefill_step
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
