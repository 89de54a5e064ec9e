"""One-stream decode tokens/s: Pomona's tensor parallel against its pipeline.

Three systems run the bench model (bench_model.py: a ~101M-parameter qwen2,
random weights, greedy decoding, the same prompt tokens) in one run:

1. single-process mlx-lm (``stream_generate``), pinned to core 0;
2. Pomona, 2 workers, ``--parallel pipeline`` (layers 4,4);
3. Pomona, 2 workers, ``--parallel tensor`` (each rank a half of every layer).

Each Pomona worker is pinned to its own core (``taskset -c r``; its runner
inherits it) and the ring runs over loopback, as bench_decode.py does; the
systems take turns, one request each per round.

From the figures it derives what one collective costs on this link. With t1
the single process's seconds per token, the pipeline's per-message cost is
``(t_pipeline - t1) / 2`` (a hidden state forward, the tokens back), and a
tensor parallel collective's is ``(t_tensor - t1 / 2) / (2 L + 1)`` (half the
compute per rank, two all_sums per layer and the step's control vector). It
then predicts tensor decode where a collective costs what RDMA does (~30 µs a
message, two messages an all_sum on two ranks).

    python bench/bench_tensor.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import Row, divergence, load_prompt, measure  # noqa: E402
from bench_model import NUM_LAYERS, OVERRIDES, default_cache_dir, ensure_model, parameter_count  # noqa: E402
from systems import (  # noqa: E402
    LOOPBACK,
    ControlServer,
    MlxLm,
    Pomona,
    Processes,
    Run,
    free_ports,
    load_average,
    run_info,
    stop_on_signals,
)

T0 = time.monotonic()
PROMPT = "The lab has four machines. Each machine holds some layers of the model."
HIDDEN = int(OVERRIDES["hidden_size"])
RDMA_MESSAGE_S = 30e-6  # JACCL over Thunderbolt 5, one message between two Macs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens to decode per request")
    p.add_argument("--repeats", type=int, default=3, help="measured requests per system")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the warm-up request")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="model cache")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1 or args.warmup_tokens < 1:
        p.error("--tokens must be at least 2, --repeats and --warmup-tokens at least 1")
    return args


def derive(
    single: float, pipeline: float, tensor: float, layers: int, probed: float
) -> dict[str, float]:
    """Per-message and per-collective costs the tok/s figures imply, what the probed
    all_sum predicts for tensor here, and tensor's tok/s where a collective costs two
    RDMA messages."""
    t1, tp, tt = 1 / single, 1 / pipeline, 1 / tensor
    collectives = 2 * layers + 1
    rdma_step = t1 / 2 + collectives * 2 * RDMA_MESSAGE_S
    return {
        "pipeline_message_s": (tp - t1) / 2,
        "tensor_collective_s": (tt - t1 / 2) / collectives,
        "probed_all_sum_s": probed,
        "collectives_per_token": collectives,
        "tensor_tps_predicted_here": 1 / (t1 / 2 + collectives * probed),
        "tensor_tps_at_rdma": 1 / rdma_step,
        "tensor_vs_single_at_rdma": t1 / rdma_step,
    }


def probe_all_sum(processes: Processes, width: int) -> float:
    """Mean seconds of one all_sum of ``width`` floats between two pinned ranks."""
    port = free_ports(2)
    hosts = processes.log_dir / "probe-hosts.json"
    hosts.write_text(json.dumps([[f"{LOOPBACK}:{port}"], [f"{LOOPBACK}:{port + 1}"]]))
    script = Path(__file__).resolve().parent / "collective_probe.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "--width", str(width)],
            env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        out, _ = procs[0].communicate(timeout=300)
        procs[1].wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return float(json.loads(out.strip().splitlines()[-1])["all_sum_s"])


def report(
    rows: list[Row], runs: dict[str, list[Run]], info: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    mean = {label: statistics.mean(r.tps for r in rs) for label, rs in runs.items()}
    single, pipeline, tensor = (mean[row.label] for row in rows)
    table = Table(title=f"One-stream decode tokens/s — {info['model_desc']}")
    for name in ("system", "cores", "tok/s", "min – max", "× single"):
        table.add_column(name, justify="left" if name in ("system", "cores") else "right")
    for row in rows:
        tps = [r.tps for r in runs[row.label]]
        pins = sorted(row.system.affinity.items())
        table.add_row(
            row.label,
            " ".join(f"r{rank}:{','.join(map(str, cpus))}" for rank, cpus in pins) or "-",
            f"{mean[row.label]:.2f}",
            f"{min(tps):.2f} – {max(tps):.2f}",
            f"{mean[row.label] / single:.2f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    d = derive(single, pipeline, tensor, NUM_LAYERS, info["probed_all_sum_s"])
    best = {label: max(r.tps for r in rs) for label, rs in runs.items()}
    b_single, b_pipeline, b_tensor = (best[row.label] for row in rows)
    console.print(
        f"tensor / pipeline: {tensor / pipeline:.3f}   tensor / single: {tensor / single:.3f}"
        f"   (best runs, the least disturbed: {b_tensor / b_pipeline:.3f} and "
        f"{b_tensor / b_single:.3f})"
    )
    console.print(
        f"implied link costs: {d['pipeline_message_s'] * 1e6:.0f} µs a pipeline message; "
        f"{d['tensor_collective_s'] * 1e6:.0f} µs a tensor collective "
        f"({d['collectives_per_token']:.0f} a token: 2 per layer and the control vector)"
    )
    probes = ", ".join(f"{p * 1e6:.0f}" for p in info["probes_s"])
    console.print(
        f"probed: {d['probed_all_sum_s'] * 1e6:.0f} µs an all_sum of one hidden state between "
        f"two pinned ranks (before, after: {probes} µs); with it tensor would decode "
        f"{d['tensor_tps_predicted_here']:.2f} tok/s here (half the single process's time + "
        "the collectives)"
    )
    console.print(
        f"at RDMA's ~{RDMA_MESSAGE_S * 1e6:.0f} µs a message (2 an all_sum on 2 ranks): "
        f"tensor would decode {d['tensor_tps_at_rdma']:.1f} tok/s, "
        f"{d['tensor_vs_single_at_rdma']:.2f}× the single process"
    )
    console.print(f"greedy tokens identical across systems and requests: {info['tokens_match']}")
    console.print(
        f"load average before / after: {info['load_before']} / {info['load_after']} "
        f"({info['cpus']} CPUs): other work on the machine skews the figures"
    )
    console.print(f"{info['date']}  {info['platform']}  mlx {info['mlx']}  mlx-lm {info['mlx_lm']}")
    console.print(f"command: {info['command']}")
    return {
        "info": info,
        "tps_mean": mean,
        "tps_runs": {label: [r.tps for r in rs] for label, rs in runs.items()},
        "derived": d,
        "tps_best": best,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    model = ensure_model(args.cache_dir, args.dtype)
    prompt = load_prompt(model, PROMPT)
    model_desc = f"qwen2, {parameter_count(model) / 1e6:.1f}M parameters, {args.dtype}"
    print(f"model: {model} ({model_desc}); prompt: {len(prompt)} tokens", flush=True)

    processes = Processes(Path(tempfile.mkdtemp(prefix="pomona-bench-tensor-")))
    control = ControlServer()
    single = MlxLm("mlx-lm, 1 process", 1, control)
    half = NUM_LAYERS // 2
    pipeline = Pomona(
        "Pomona pipeline",
        2,
        f"{half},{half}",
        ("--parallel", "pipeline", "--http-port", "0"),
        tag="-pipeline",
    )
    tensor = Pomona(
        "Pomona tensor", 2, "", ("--parallel", "tensor", "--http-port", "0"), tag="-tensor"
    )
    systems: list[MlxLm | Pomona] = [single, pipeline, tensor]
    rows = [
        Row("mlx-lm, 1 process", single),
        Row("Pomona, 2 workers, pipeline", pipeline),
        Row("Pomona, 2 workers, tensor", tensor),
    ]

    load_before = load_average()
    with processes.measuring(args.keep_logs, stop=control.close):
        # The link probed before and after the systems run: the less disturbed of the two.
        probes = [probe_all_sum(processes, HIDDEN)]
        runs, _ = measure(systems, rows, processes, args, model, prompt)
        probes.append(probe_all_sum(processes, HIDDEN))
    info = run_info(
        "bench_tensor.py",
        T0,
        model_desc,
        load_before,
        tokens_match=divergence(runs),
        probed_all_sum_s=min(probes),
        probes_s=probes,
    )
    result = report(rows, runs, info, args)
    print(f"whole run: {info['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
