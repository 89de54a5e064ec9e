"""Aggregate decode tokens/s of Pomona and mlx_lm.server at 1, 4, 8 and 16 concurrent streams.

Both serve the decode benchmark's ~101M-parameter qwen2 (random weights) over
two pipeline ranks, each rank pinned to its own core, in one run:

1. Pomona: two local workers (``taskset -c r pomona worker ...``; each runner
   inherits its worker's core) and a coordinator, through its OpenAI API
   (``/v1/completions``, ``stream: true``): the full request path;
2. ``mlx_lm.server --pipeline`` under ``mlx.launch --backend ring -n 2``,
   each rank exec'd under ``taskset -c $MLX_RANK`` (see ``servers.py``),
   through its OpenAI API, with mlx.launch stopped (SIGSTOP) while measured
   unless ``--launcher-running``: its I/O relay spins on a core otherwise.

Both get the same BLAS: by default the system's OpenBLAS, one thread per rank,
LD_PRELOADed (``--blas``): the Linux mlx[cpu] wheel bundles netlib's reference
BLAS, on which a batch of N rows costs N times one row, for any server.

The same asyncio + aiohttp client drives both: N clients send one greedy
request each at once, every prompt different, each asking for ``--tokens``.
For stream i: f_i = arrival of its first token, l_i = arrival of its last,
n_i = its ``usage.completion_tokens``. Then

    aggregate decode tok/s = sum_i (n_i - 1) / (max_i l_i - min_i f_i)

(for one stream, the decode benchmark's (tokens - 1) / (last - first)).
Streamed text arrives only once it is valid UTF-8, so the prompts are chosen
(by a forward pass here) such that each one's first greedy token is text on
its own: its first event is its first token on both servers.

Each system is warmed up; then for each concurrency the two take turns
(order alternating), the idle one stopped (``pause``) so that it takes no CPU.

    python bench/bench_concurrency.py [--tokens 64] [--concurrency 1,4,8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import default_cache_dir, ensure_model, parameter_count  # noqa: E402
from servers import MlxLmServer, PomonaHttp  # noqa: E402
from systems import (  # noqa: E402
    NO_PIN,
    Processes,
    cpu_seconds,
    halves,
    load_average,
    run_info,
    stop_on_signals,
    wait_for,
)

T0 = time.monotonic()
# Short: on a CPU, prefilling a newcomer stalls every running stream for a while.
TEMPLATE = ", request {i}:"
Server = PomonaHttp | MlxLmServer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens each stream asks for")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated stream counts")
    p.add_argument("--warmup-tokens", type=int, default=4, help="tokens of the warm-up requests")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--model", type=Path, default=None, help="an mlx-lm model folder to use")
    p.add_argument("--layers", default="", help="Pomona's layers per worker (default: halves)")
    p.add_argument(
        "--no-pin", action="store_true", help="pin no rank to a core (a GPU machine's ranks)"
    )
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="model cache")
    p.add_argument(
        "--launcher-running",
        action="store_true",
        help="measure mlx_lm.server with mlx.launch running, as launched",
    )
    p.add_argument(
        "--blas",
        default="auto",
        metavar="auto|bundled|LIB",
        help="BLAS for both systems' ranks (Linux): auto = the system's OpenBLAS, one thread"
        " per rank, where there is one (LD_PRELOAD); bundled = the one in the mlx wheel",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one server resident at a time: each is started, swept and stopped before the "
        "other (a model too big for two copies on one accelerator)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    p.add_argument("-v", "--verbose", action="store_true", help="commands and CPU by process")
    args = p.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency takes comma-separated integers, got {args.concurrency!r}")
    if args.tokens < 2 or args.warmup_tokens < 1 or not args.levels or min(args.levels) < 1:
        p.error("--tokens must be at least 2; --warmup-tokens and every concurrency at least 1")
    return args


# -- prompts ------------------------------------------------------------------


def _leads() -> Iterator[str]:
    """Distinct first characters, so that no prompt is a prefix-cache hit of another."""
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits
    yield from alphabet
    for a in alphabet:
        for b in alphabet:
            yield a + b


def pick_prompts(model: Path, count: int, spare: int) -> tuple[list[str], list[str]]:
    """``count`` prompts whose first greedy token is text by itself, and ``spare`` others.

    Random weights emit arbitrary bytes, and both servers hold text back until
    it is valid UTF-8 (mlx-lm's streaming detokenizer), so a stream's first
    event may come tokens late; for these prompts it carries the first token.
    The choice is kept beside the model: on a CPU it takes a minute.
    """
    saved = model.with_name(f"{model.name}.concurrency-prompts.json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads(saved.read_text())
        if known["template"] == TEMPLATE and len(known["chosen"]) >= count:
            if len(known["others"]) >= spare:
                return known["chosen"][:count], known["others"][:spare]
    chosen, others = _first_token_is_text(model, count, spare)
    with contextlib.suppress(OSError):
        record = {"template": TEMPLATE, "chosen": chosen, "others": others}
        saved.write_text(json.dumps(record, indent=1))
    return chosen, others


def _first_token_is_text(model: Path, count: int, spare: int) -> tuple[list[str], list[str]]:
    import mlx.core as mx
    from mlx_lm import load

    loaded = load(str(model))
    net, tokenizer = loaded[0], loaded[1]
    chosen: list[str] = []
    others: list[str] = []
    for i, lead in enumerate(_leads()):
        if len(chosen) >= count and len(others) >= spare:
            break
        text = f"{lead}{TEMPLATE.format(i=i)}"
        logits = net(mx.array(tokenizer.encode(text))[None])[0, -1]
        token = mx.argmax(logits).item()
        assert isinstance(token, int)
        detokenizer = tokenizer.detokenizer
        detokenizer.add_token(token)
        visible = token not in tokenizer.eos_token_ids and detokenizer.last_segment != ""
        (chosen if visible and len(chosen) < count else others).append(text)
    del net
    mx.clear_cache()
    return chosen, others[:spare]


# -- the client ---------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """One streamed request: seconds since the turn began, tokens, text."""

    prompt: str
    sent: float
    first: float
    last: float
    tokens: int
    cached: int
    finish: str
    text: str


@dataclass(frozen=True)
class Turn:
    """One system at one concurrency."""

    streams: list[Stream]
    wall: float
    cpu: dict[str, float]  # CPU seconds by process of the measured system and client
    idle_cpu: float  # CPU seconds of the other (paused) system's processes
    other_cpu: float  # CPU seconds of everything else on the machine

    @property
    def decode_seconds(self) -> float:
        return max(s.last for s in self.streams) - min(s.first for s in self.streams)

    @property
    def decode_tokens(self) -> int:
        return sum(s.tokens - 1 for s in self.streams)

    @property
    def tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def ttft(self) -> float:
        return statistics.median(s.first - s.sent for s in self.streams)


async def stream_completion(
    session: Any, url: str, model: str, prompt: str, max_tokens: int, t0: float
) -> Stream:
    """POST one streaming completion; time its first and last token."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter() - t0
    first = last = 0.0
    tokens = cached = -1
    finish, parts = "", []
    async with session.post(f"{url}/v1/completions", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{url}: HTTP {reply.status}: {await reply.text()}")
        async for raw in reply.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators and ": keepalive" comments
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter() - t0
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{url}: error in stream: {event['error']}")
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
                cached = int((event["usage"].get("prompt_tokens_details") or {}).get(
                    "cached_tokens", 0
                ))  # fmt: skip
            for choice in event.get("choices") or []:
                if choice.get("text") and not first:
                    first = now
                parts.append(choice.get("text") or "")
                if choice.get("finish_reason"):
                    finish, last = choice["finish_reason"], now
    if tokens < 0 or not last:
        raise RuntimeError(f"{url}: the stream ended without usage or a finish_reason")
    text = "".join(parts)
    return Stream(prompt, sent, first or last, last, tokens, cached, finish, text)


async def _streams(url: str, model: str, prompts: list[str], max_tokens: int) -> list[Stream]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        jobs = [stream_completion(session, url, model, p, max_tokens, t0) for p in prompts]
        return list(await asyncio.gather(*jobs))


def _busy_cpu_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def turn(system: Server, idle: Server, model: str, prompts: list[str], max_tokens: int) -> Turn:
    """All ``prompts`` at once against ``system``, with ``idle`` paused."""
    idle.pause()
    system.resume()
    pids = {**system.pids, "client (this script)": os.getpid()}
    idle_pids = {k: v for k, v in idle.pids.items() if v != os.getpid()}
    before, idle_before, busy_before = (
        cpu_seconds(pids),
        cpu_seconds(idle_pids),
        _busy_cpu_seconds(),
    )
    start = time.perf_counter()
    try:
        streams = asyncio.run(_streams(system.url, model, prompts, max_tokens))
    finally:
        wall = time.perf_counter() - start
        system.pause()
    after, idle_after, busy_after = cpu_seconds(pids), cpu_seconds(idle_pids), _busy_cpu_seconds()
    cpu = {k: v - before.get(k, v) for k, v in after.items()}
    idle_cpu = sum(v - idle_before.get(k, v) for k, v in idle_after.items())
    other = busy_after - busy_before - sum(cpu.values()) - idle_cpu
    return Turn(streams, wall, cpu, idle_cpu, max(0.0, other))


# -- the run ------------------------------------------------------------------


class _Nobody:
    """The idle system of a ``--sequential`` turn: none is resident."""

    pids: dict[str, int] = {}

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


def measure(
    pomona: PomonaHttp,
    mlx: MlxLmServer,
    processes: Processes,
    args: argparse.Namespace,
    model: Path,
    prompts: list[str],
    warmup: list[str],
    blas: dict[str, list[str]],
) -> tuple[dict[str, str], dict[int, dict[str, Turn]]]:
    """Start both servers, warm each up, then let them take turns per concurrency.

    With ``--sequential`` one server at a time is started, warmed up, swept
    over every concurrency and stopped before the other starts.
    """
    groups = [[pomona], [mlx]] if args.sequential else [[pomona, mlx]]
    names: dict[str, str] = {}
    turns: dict[int, dict[str, Turn]] = {level: {} for level in args.levels}
    for group in groups:
        for system in group:
            system.start(processes, model)
        for system in group:
            try:
                wait_for(f"{system.name} to serve", system.ready, 300, system.procs)
            except TimeoutError as e:
                problem = getattr(system, "problem", "")
                raise TimeoutError(
                    f"{e}" + (f" (last problem: {problem})" if problem else "")
                ) from e
            system.pause()
            names[system.name] = _served_model(system.url) if system is pomona else "default_model"
        print(
            f"up: {', '.join(s.name for s in group)} ({time.monotonic() - T0:.0f} s); warming up",
            flush=True,
        )
        pairs = [(s, next((o for o in group if o is not s), _Nobody())) for s in group]
        for system, idle in pairs:
            # The first request loads mlx_lm.server's model; the second batches two.
            turn(system, idle, names[system.name], warmup[:1], args.warmup_tokens)
            turn(system, idle, names[system.name], warmup[1:3], args.warmup_tokens)
        print(f"warm ({time.monotonic() - T0:.0f} s)", flush=True)
        used = 0
        for k, level in enumerate(args.levels):
            batch, used = prompts[used : used + level], used + level
            for system, idle in pairs[k % len(pairs) :] + pairs[: k % len(pairs)]:
                result = turn(system, idle, names[system.name], batch, args.tokens)
                turns[level][system.name] = result
                print(
                    f"  {level:>3} streams  {system.name:<26} {result.tps:8.2f} tok/s"
                    f"  ({result.decode_tokens} tokens in {result.decode_seconds:.2f} s,"
                    f" TTFT p50 {result.ttft:.2f} s)",
                    flush=True,
                )
        for system in group:
            blas[system.name] = blas_libraries(system.rank_pids)
            if args.sequential:
                system.stop()
    return names, turns


def blas_to_preload(choice: str) -> str:
    """What to LD_PRELOAD into both systems for ``--blas`` ("" for nothing).

    The Linux mlx[cpu] wheel bundles netlib's reference BLAS, whose matmul
    costs the same per row at any batch size: batching cannot raise
    throughput, for any server. OpenBLAS (or MLX on a Mac) can.
    """
    if choice == "bundled" or sys.platform != "linux":
        return ""
    if choice != "auto":
        if not Path(choice).exists():
            raise SystemExit(f"--blas {choice}: no such file")
        return str(Path(choice).resolve())
    import ctypes.util

    return ctypes.util.find_library("openblas") or ""


def blas_libraries(pids: list[int]) -> list[str]:
    """The BLAS libraries mapped into each of ``pids`` (Linux), e.g. libblas-….so.3."""
    found: set[str] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        found.update(Path(line.split()[-1]).name for line in maps.splitlines() if "blas" in line)
    return sorted(found)


def _served_model(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as reply:
        return str(json.load(reply)["data"][0]["id"])


def same_text(turns: dict[int, dict[str, Turn]], a: str, b: str) -> tuple[int, int]:
    """How many streams got the same greedy text from ``a`` and ``b``, of how many."""
    same = total = 0
    for by_system in turns.values():
        texts = {s.prompt: s.text for s in by_system[b].streams}
        for s in by_system[a].streams:
            total += 1
            same += texts.get(s.prompt) == s.text
    return same, total


def report(
    pomona: PomonaHttp,
    mlx: MlxLmServer,
    turns: dict[int, dict[str, Turn]],
    info: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    p, m = pomona.name, mlx.name
    table = Table(title=f"Aggregate decode tokens/s — {info['model_desc']}, {args.tokens} tokens")
    for name in (
        "streams",
        "Pomona tok/s",
        "mlx_lm.server tok/s",
        "Pomona / mlx",
        "TTFT p50 P / m",
        "CPU ms/tok P / m",
        "other load",
    ):
        table.add_column(name, justify="right")
    for level, by in turns.items():
        tp, tm = by[p], by[m]
        table.add_row(
            str(level),
            f"{tp.tps:.1f}",
            f"{tm.tps:.1f}",
            f"{tp.tps / tm.tps:.2f}" if tm.tps else "-",
            f"{tp.ttft:.2f} / {tm.ttft:.2f} s",
            f"{_cpu_ms(tp):.0f} / {_cpu_ms(tm):.0f}",
            f"{tp.other_cpu / tp.wall:.2f} / {tm.other_cpu / tm.wall:.2f} cores",
        )
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(
        "tok/s = sum over streams of (tokens - 1) / (last token of any stream - first token of"
        " any stream); CPU ms/tok: the measured system's processes and the client, per"
        " generated token; other load: CPU of everything else on the machine during the turn"
    )
    scaling: dict[str, float] = {}
    lo, hi = min(turns), 8 if 8 in turns else max(turns)
    for name in (p, m):
        scaling[name] = turns[hi][name].tps / turns[lo][name].tps
    target = "meets" if scaling[p] >= 4 else "BELOW"
    console.print(
        f"Pomona scaling, {hi} streams / {lo}: {scaling[p]:.2f}x (target >= 4x: {target}); "
        f"mlx_lm.server: {scaling[m]:.2f}x"
    )
    below = [str(level) for level, by in turns.items() if by[p].tps < by[m].tps]
    verdict = "meets" if not below else f"BELOW at {', '.join(below)} streams"
    console.print(f"Pomona >= 1.0x mlx_lm.server at every concurrency: {verdict}")
    same, total = same_text(turns, p, m)
    counts = sorted({s.tokens for by in turns.values() for t in by.values() for s in t.streams})
    cached = sum(s.cached for t in (by[m] for by in turns.values()) for s in t.streams)
    console.print(
        f"greedy text identical on both servers: {same}/{total} streams; tokens per stream:"
        f" {', '.join(map(str, counts))} (asked {args.tokens}); mlx_lm.server prompt-cache"
        f" hits: {cached} tokens"
    )
    for system in (pomona, mlx):
        pins = " ".join(f"r{r}:{','.join(map(str, c))}" for r, c in sorted(system.affinity.items()))
        blas = ", ".join(info["blas"][system.name]) or "?"
        console.print(f"{system.name}: ranks pinned to cores {pins}; BLAS in the ranks: {blas}")
    if info["preload_blas"]:
        console.print(f"LD_PRELOAD={info['preload_blas']} OPENBLAS_NUM_THREADS=1 in both systems")
    launcher = "running (as launched)" if args.launcher_running else "stopped (SIGSTOP)"
    console.print(f"mlx.launch while mlx_lm.server was measured: {launcher}")
    console.print(
        f"load average before / after: {info['load_before']} / {info['load_after']} "
        f"({info['cpus']} CPUs)"
    )
    console.print(f"{info['date']}  {info['platform']}  mlx {info['mlx']}  mlx-lm {info['mlx_lm']}")
    console.print(f"command: {info['command']}")
    if args.verbose:
        console.print("CPU ms per generated token, by process:")
        for level, by in turns.items():
            for name, t in by.items():
                parts = ", ".join(f"{k} {1e3 * v / _tokens(t):.1f}" for k, v in t.cpu.items())
                console.print(f"  {level:>3} {name}: {parts}; paused system {t.idle_cpu:.2f} s")
        console.print("commands:")
        for system in (pomona, mlx):
            for argv in system.commands:
                console.print(f"  {system.name}: {shlex.join(argv)}", soft_wrap=True)
    return {
        "info": info,
        "tps": {level: {name: t.tps for name, t in by.items()} for level, by in turns.items()},
        "scaling": scaling,
        "turns": {
            level: {
                name: {
                    "tps": t.tps,
                    "decode_seconds": t.decode_seconds,
                    "wall": t.wall,
                    "cpu": t.cpu,
                    "idle_cpu": t.idle_cpu,
                    "other_cpu": t.other_cpu,
                    "streams": [asdict(s) for s in t.streams],
                }
                for name, t in by.items()
            }
            for level, by in turns.items()
        },
    }


def _tokens(t: Turn) -> int:
    return max(1, sum(s.tokens for s in t.streams))


def _cpu_ms(t: Turn) -> float:
    return 1e3 * sum(t.cpu.values()) / _tokens(t)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()

    if args.no_pin:
        os.environ[NO_PIN] = "1"  # inherited by every process started from here on
    model = args.model or ensure_model(args.cache_dir, args.dtype)
    config = json.loads((model / "config.json").read_text())
    dtype = args.dtype if args.model is None else config.get("torch_dtype", "?")
    model_desc = f"{config['model_type']}, {parameter_count(model) / 1e6:.1f}M parameters, {dtype}"
    prompts, warmup = pick_prompts(model, sum(args.levels), 3)
    print(f"model: {model} ({model_desc}); {len(prompts)} prompts", flush=True)

    preload = blas_to_preload(args.blas)
    if preload:
        # Inherited by every process started from here on: workers, runners, ranks.
        os.environ["LD_PRELOAD"] = preload
        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # one core per rank
    log_dir = Path(tempfile.mkdtemp(prefix="pomona-bench-concurrency-"))
    processes = Processes(log_dir)
    widest = max(args.levels)
    pomona = PomonaHttp("Pomona, 2 workers", 2, args.layers or halves(model), max_batch=widest)
    mlx = MlxLmServer("mlx_lm.server, 2 ranks", 2, widest, args.launcher_running)
    load_before = load_average()
    blas: dict[str, list[str]] = {}

    def stop_mlx() -> None:
        if mlx.procs:
            mlx.stop()

    with processes.measuring(args.keep_logs, stop=stop_mlx):
        names, turns = measure(pomona, mlx, processes, args, model, prompts, warmup, blas)
    info = run_info(
        "bench_concurrency.py",
        T0,
        model_desc,
        load_before,
        served_models=names,
        blas=blas,
        preload_blas=preload,
    )
    result = report(pomona, mlx, turns, info, args)
    print(f"whole run: {info['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
