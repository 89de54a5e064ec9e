"""Decode tokens/s of single-process mlx-lm, mlx-lm's own 2-rank pipeline and Pomona.

All three run the same ~101M-parameter qwen2 model (random weights, greedy
decoding, the same prompt tokens) in one run of this script:

1. single-process mlx-lm (``stream_generate``), pinned to core 0;
2. mlx-lm's pipeline: ``sharded_load`` with a pipeline group, two ranks started
   by ``mlx.launch --backend ring -n 2``, rank r pinned to core r;
3. Pomona: two local workers (``taskset -c r pomona worker ...``; each runner
   inherits its worker's core), a coordinator, and this script as the gRPC
   client, through the full request path (client -> coordinator -> head
   runner -> ring -> tokens back). Coordinator and client are not pinned.

Each rank stands for one Mac, hence one core each. Decode time runs from the
first streamed token to the last; tokens/s = (tokens - 1) / that time. Every
system gets one short warm-up request, then the systems take turns, one
request each per round, so that load from anything else on the machine falls
on all three alike.

    python bench/bench_decode.py [--tokens 128] [--repeats 3]

On a GPU machine, at a real model's shape (a folder from ``gpu_cluster.py``),
Apple's protocol (a 4,096-token prompt, then 128 tokens), unpinned:

    python bench/bench_decode.py --model /tmp/pomona-gpu-model/llama-3.1-8b-l32 \
        --prompt-tokens 4096 --no-pin

At the Llama-3.1-70B shape in 4-bit (``gpu_cluster.py --bits 4`` writes it),
three resident copies do not fit one GPU: ``--sequential`` measures one system
at a time (other load on the machine then falls less evenly on them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import default_cache_dir, ensure_model, parameter_count  # noqa: E402
from systems import (  # noqa: E402
    NO_PIN,
    ControlServer,
    MlxLm,
    Pomona,
    Processes,
    Run,
    cpu_seconds,
    halves,
    load_average,
    run_info,
    stop_on_signals,
    wait_for,
)

T0 = time.monotonic()
DEFAULT_PROMPT = "The lab has four machines. Each machine holds some layers of the model."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens to decode per request")
    p.add_argument("--repeats", type=int, default=3, help="measured requests per system")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the warm-up request")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--prompt-tokens", type=int, default=0, help="a prompt this many tokens long")
    p.add_argument("--model", type=Path, default=None, help="an mlx-lm model folder to use")
    p.add_argument("--layers", default="", help="Pomona's layers per worker (default: halves)")
    p.add_argument(
        "--no-pin", action="store_true", help="pin no rank to a core (a GPU machine's ranks)"
    )
    p.add_argument(
        "--pomona-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option for Pomona's coordinator, e.g. --pomona-option=--prefill-step=2048",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one system resident at a time: each is started, measured over all its rounds "
        "and stopped before the next (a model too big for three copies on one accelerator)",
    )
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="model cache")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    p.add_argument("-v", "--verbose", action="store_true", help="print every process's command")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1 or args.warmup_tokens < 1:
        p.error("--tokens must be at least 2, --repeats and --warmup-tokens at least 1")
    return args


def load_prompt(model: Path, text: str, length: int = 0) -> list[int]:
    """The prompt's tokens; with ``length``, the text repeated to exactly that many."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    bos = tokenizer.bos_token
    tokens = list(
        tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
    )
    if length:
        more = list(tokenizer.encode(" " + text, add_special_tokens=False))
        while len(tokens) < length:
            tokens += more
        tokens = tokens[:length]
    return tokens


@dataclass(frozen=True)
class Row:
    """One line of the results: a system, measured in its own turns.

    mlx-lm's pipeline is measured twice on the same ranks: with ``mlx.launch``
    running, as launched, and with it paused (SIGSTOP), which leaves the ranks
    and their ring untouched but stops the launcher's I/O loop, which busy-polls
    a core (see ``MlxLm.pause``).
    """

    label: str
    system: MlxLm | Pomona
    launcher_running: bool = True

    def turn(
        self, max_tokens: int, idle_pids: dict[str, int]
    ) -> tuple[Run, dict[str, float], dict[str, float]]:
        """One request; the CPU seconds its processes and the idle ones spent on it."""
        if self.launcher_running:
            self.system.resume()
        before = cpu_seconds(self.system.pids)
        idle_before = cpu_seconds(idle_pids)
        run = self.system.request(max_tokens)
        after = cpu_seconds(self.system.pids)
        idle_after = cpu_seconds(idle_pids)
        self.system.pause()
        return (
            run,
            {k: v - before.get(k, v) for k, v in after.items()},
            {k: v - idle_before.get(k, v) for k, v in idle_after.items()},
        )


def measure(
    systems: list[MlxLm | Pomona],
    rows: list[Row],
    processes: Processes,
    args: argparse.Namespace,
    model: Path,
    prompt: list[int],
) -> tuple[dict[str, list[Run]], dict[str, dict[str, float]]]:
    """Start every system, warm each up, then let the rows take turns.

    With ``--sequential`` one system at a time is started, warmed up, measured
    over all its rounds and stopped before the next one starts.

    Returns every run by row, and the CPU seconds each of a row's processes
    spent in its measured requests.
    """
    runs: dict[str, list[Run]] = {row.label: [] for row in rows}
    cpu: dict[str, dict[str, float]] = {row.label: {} for row in rows}
    for group in [[s] for s in systems] if args.sequential else [systems]:
        _measure_together(group, [r for r in rows if r.system in group], processes, args,
                          model, prompt, runs, cpu)  # fmt: skip
    return runs, cpu


def _measure_together(
    systems: list[MlxLm | Pomona],
    rows: list[Row],
    processes: Processes,
    args: argparse.Namespace,
    model: Path,
    prompt: list[int],
    runs: dict[str, list[Run]],
    cpu: dict[str, dict[str, float]],
) -> None:
    for system in systems:
        system.start(processes, model, prompt)
    for system in systems:
        try:
            wait_for(f"{system.name} to load", system.ready, 240, system.procs)
        except TimeoutError as e:
            problem = getattr(system, "problem", "")
            raise TimeoutError(f"{e}" + (f" (last problem: {problem})" if problem else "")) from e
        system.pause()
    names = ", ".join(s.name for s in systems)
    print(f"loaded: {names} ({time.monotonic() - T0:.0f} s)", flush=True)
    for row in rows:
        if row.launcher_running:
            row.turn(args.warmup_tokens, {})
    for r in range(args.repeats):
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            idle = {
                f"idle {s.name}: {k}": pid
                for s in systems
                if s is not row.system
                for k, pid in s.pids.items()
                if pid != os.getpid()
            }
            run, spent, idle_spent = row.turn(args.tokens, idle)
            runs[row.label].append(run)
            for label, seconds in (spent | idle_spent).items():
                cpu[row.label][label] = cpu[row.label].get(label, 0.0) + seconds
            print(
                f"  round {r + 1}/{args.repeats}  {row.label:<38} {len(run.tokens):>4} tokens"
                f"  {run.tps:7.2f} tok/s",
                flush=True,
            )
    for system in systems:
        system.stop()


def divergence(runs: dict[str, list[Run]]) -> str:
    """Whether every measured run produced the same greedy tokens."""
    reference_name, reference = next(iter(runs.items()))
    ref = reference[0].tokens
    for name, system_runs in runs.items():
        for run in system_runs:
            if run.tokens != ref:
                at = next(
                    (i for i, (a, b) in enumerate(zip(run.tokens, ref, strict=False)) if a != b),
                    min(len(run.tokens), len(ref)),
                )
                return f"NO: {name} differs from {reference_name} at token {at}"
    return "yes"


def report(
    rows: list[Row],
    runs: dict[str, list[Run]],
    cpu: dict[str, dict[str, float]],
    info: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    mean = {label: statistics.mean(r.tps for r in rs) for label, rs in runs.items()}
    single, launched, paused, pomona = (mean[row.label] for row in rows)
    table = Table(title=f"Decode tokens/s — {info['model_desc']}")
    for name, justify in (
        ("system", "left"),
        ("cores", "left"),
        ("tok/s", "right"),
        ("min – max", "right"),
        ("× single", "right"),
        ("TTFT s", "right"),
        ("CPU ms/token", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        tps = [r.tps for r in runs[row.label]]
        pins = sorted(row.system.affinity.items())
        table.add_row(
            row.label,
            " ".join(f"r{rank}:{','.join(map(str, cpus))}" for rank, cpus in pins) or "-",
            f"{mean[row.label]:.2f}",
            f"{min(tps):.2f} – {max(tps):.2f}",
            f"{mean[row.label] / single:.2f}",
            f"{statistics.median(r.ttft_s for r in runs[row.label]):.3f}",
            f"{1e3 * _own_cpu(cpu[row.label]) / _tokens(runs[row.label]):.0f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    counts = sorted({len(r.tokens) for rs in runs.values() for r in rs})
    console.print(
        f"tokens per measured request: {', '.join(map(str, counts))} (asked {args.tokens}); "
        f"tok/s = (tokens - 1) / (last token - first token), mean of {args.repeats} requests"
    )
    ttft = {label: statistics.median(r.ttft_s for r in rs) for label, rs in runs.items()}
    ttft_pomona, ttft_pipeline = ttft[rows[3].label], ttft[rows[2].label]
    ratios = {
        "ttft_pomona_vs_pipeline": ttft_pomona / ttft_pipeline,
        "ttft_pomona_vs_single": ttft_pomona / ttft[rows[0].label],
        "pomona_vs_pipeline": pomona / paused,
        "pomona_vs_pipeline_as_launched": pomona / launched,
        "pomona_vs_single": pomona / single,
    }
    for text, value, target in (
        ("Pomona / mlx-lm pipeline (launcher paused)", ratios["pomona_vs_pipeline"], 0.9),
        ("Pomona / single process                   ", ratios["pomona_vs_single"], 0.85),
    ):
        verdict = "meets" if value >= target else "BELOW"
        console.print(f"{text}: {value:.3f}  (target >= {target}: {verdict})")
    as_launched = ratios["pomona_vs_pipeline_as_launched"]
    console.print(f"Pomona / mlx-lm pipeline (as launched)     : {as_launched:.3f}")
    console.print(
        f"time to first token ({info['prompt_tokens']}-token prompt),"
        f" Pomona / mlx-lm pipeline: {ratios['ttft_pomona_vs_pipeline']:.3f};"
        f" Pomona / single: {ratios['ttft_pomona_vs_single']:.3f}"
    )
    console.print(f"greedy tokens identical across systems and requests: {info['tokens_match']}")
    console.print(
        f"load average before / after: {info['load_before']} / {info['load_after']} "
        f"({info['cpus']} CPUs): other work on the machine skews the figures"
    )
    console.print(f"{info['date']}  {info['platform']}  mlx {info['mlx']}  mlx-lm {info['mlx_lm']}")
    console.print(f"command: {info['command']}")
    if args.verbose:
        console.print("CPU ms per token during each row's requests, by process:")
        for row in rows:
            n = _tokens(runs[row.label])
            own = {k: v for k, v in cpu[row.label].items() if not k.startswith("idle ")}
            idle = sum(v for k, v in cpu[row.label].items() if k.startswith("idle "))
            parts = ", ".join(f"{k} {1e3 * v / n:.1f}" for k, v in own.items())
            console.print(f"  {row.label}: {parts}; the other systems, idle: {1e3 * idle / n:.1f}")
        console.print("commands:")
        for system in dict.fromkeys(row.system for row in rows):
            for argv in system.commands:
                console.print(f"  {system.name}: {shlex.join(argv)}", soft_wrap=True)
    return {
        "info": info,
        "tps_mean": mean,
        "ttft_median_s": ttft,
        "tps_runs": {label: [r.tps for r in rs] for label, rs in runs.items()},
        "tokens_runs": {label: [len(r.tokens) for r in rs] for label, rs in runs.items()},
        "ratios": ratios,
        "cpu_ms_per_token": {
            label: {k: 1e3 * v / _tokens(runs[label]) for k, v in parts.items()}
            for label, parts in cpu.items()
        },
    }


def _own_cpu(parts: dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if not k.startswith("idle "))


def _tokens(runs: list[Run]) -> int:
    return max(1, sum(len(r.tokens) for r in runs))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()

    if args.no_pin:
        os.environ[NO_PIN] = "1"  # inherited by every process started from here on
    model = args.model or ensure_model(args.cache_dir, args.dtype)
    params = parameter_count(model)
    prompt = load_prompt(model, args.prompt, args.prompt_tokens)
    config = json.loads((model / "config.json").read_text())
    dtype = args.dtype if args.model is None else config.get("torch_dtype", "?")
    model_desc = f"{config['model_type']}, {params / 1e6:.1f}M parameters, {dtype}"
    print(f"model: {model} ({model_desc}); prompt: {len(prompt)} tokens", flush=True)

    log_dir = Path(tempfile.mkdtemp(prefix="pomona-bench-"))
    processes = Processes(log_dir)
    control = ControlServer()
    single = MlxLm("mlx-lm, 1 process", 1, control)
    pipeline = MlxLm("mlx-lm pipeline, 2 ranks", 2, control)
    pomona = Pomona(
        "Pomona, 2 workers",
        2,
        args.layers or halves(model),
        # Every request repeats the prompt: without the prefix cache each one
        # prefills it, as each mlx-lm request does.
        options=["--parallel", "pipeline", "--prompt-cache-gb", "0", *args.pomona_option],
    )
    systems: list[MlxLm | Pomona] = [single, pipeline, pomona]
    rows = [
        Row("mlx-lm, 1 process", single),
        Row("mlx-lm pipeline, 2 ranks (mlx.launch)", pipeline),
        Row("mlx-lm pipeline, launcher paused", pipeline, launcher_running=False),
        Row("Pomona, 2 workers", pomona),
    ]
    load_before = load_average()
    with processes.measuring(args.keep_logs, stop=control.close):
        runs, cpu = measure(systems, rows, processes, args, model, prompt)
    info = run_info(
        "bench_decode.py",
        T0,
        model_desc,
        load_before,
        prompt_tokens=len(prompt),
        tokens_match=divergence(runs),
    )
    result = report(rows, runs, cpu, info, args)
    print(f"whole run: {info['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
