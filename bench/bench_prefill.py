"""Time to first token of a long prompt: Pomona on pinned workers against mlx-lm.

In one run, on the benchmark's ~101M-parameter qwen2 (random weights, greedy):

1. single-process mlx-lm (``stream_generate``, its default 2048-token prefill
   step), pinned to core 0: TTFT of a ``--prompt-tokens`` prompt, then decode
   tok/s over ``--gen-tokens``;
2. Pomona, ``--workers`` local workers pinned one core each (``taskset``, as
   ``bench_decode.py`` pins them), one cluster per ``--prefill-step`` given:
   TTFT of a fresh ``--prompt-tokens`` prompt (new token ids every round, so the
   prefix cache cannot help), then the second chat turn, that prompt + 64 new
   tokens, whose history the prefix cache restores: its TTFT, and decode tok/s
   over ``--gen-tokens``.

Each system gets one warm-up request, then the systems take turns, one
measurement each per round, so that other load on the machine falls on all
alike. Printed: Pomona's TTFT ÷ mlx-lm's (targets <= 0.6 on 2 workers, <= 0.45
on 3 and <= 0.35 on 4, with ``--num-layers 12`` so that every split is even), the
second turn's TTFT ÷ the first turn's (target <= 0.1) and decode tok/s ÷
mlx-lm's, medians over ``--repeats`` rounds, for every chunk size.

    python bench/bench_prefill.py [--workers 2] [--prompt-tokens 4096]
        [--prefill-step 256,512,1024] [--repeats 3]

Three and four pinned ranks need as many free cores (the GPU machine's 16,
with MLX's CPU build):

    python bench/bench_prefill.py --small --num-layers 12 --workers 3,4 \
        --prefill-step 256,512 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import (  # noqa: E402
    NUM_LAYERS,
    SMALL,
    default_cache_dir,
    ensure_model,
    parameter_count,
)
from systems import (  # noqa: E402
    ControlServer,
    MlxLm,
    Pomona,
    Processes,
    load_average,
    run_info,
    stop_on_signals,
    wait_for,
)

NEW_TOKENS = 64  # the second turn's new tokens
# Issue 13's TTFT targets, Pomona ÷ single-process mlx-lm, by pinned workers.
TTFT_TARGETS = {2: 0.6, 3: 0.45, 4: 0.35}
T0 = time.monotonic()


class PomonaCluster(Pomona):
    """A Pomona cluster with its prefill chunk size."""

    def __init__(self, workers: int, prefill_step: int, num_layers: int = NUM_LAYERS):
        # Layers split as evenly as they go, as many ranks as workers (one core each).
        sizes = [num_layers // workers + (i < num_layers % workers) for i in range(workers)]
        layers = ",".join(map(str, sizes))
        super().__init__(f"Pomona, {workers} workers, chunk {prefill_step}", workers, layers)
        self.prefill_step = prefill_step
        self.tag = f"-w{workers}-c{prefill_step}"
        self.prefill_step = prefill_step

    def coordinator_options(self) -> list[str]:
        step = ["--prefill-step", str(self.prefill_step), "--http-port", "0"]
        return [*super().coordinator_options(), *step]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workers",
        default="2",
        help="Pomona workers, one core each; several (1,2): one cluster each, and TTFT is "
        "also given against the 1-worker cluster of the same chunk size (the pipelining gain)",
    )
    p.add_argument("--prompt-tokens", type=int, default=4096, help="first turn's prompt")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens decoded for decode tok/s")
    p.add_argument(
        "--prefill-step",
        default="512",
        help="Pomona's prefill chunk sizes, comma-separated: one cluster each",
    )
    p.add_argument("--repeats", type=int, default=3, help="measured rounds")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="model cache")
    p.add_argument(
        "--small", action="store_true", help="a model a quarter as wide (~20M parameters)"
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=NUM_LAYERS,
        help="the model's layers: 12 splits evenly over 2, 3 and 4 workers",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = p.parse_args(argv)
    try:
        args.steps = [int(x) for x in args.prefill_step.split(",")]
        args.sizes = [int(x) for x in args.workers.split(",")]
    except ValueError:
        p.error("--prefill-step and --workers take numbers, comma-separated, such as 256,512")
    if min(args.sizes) < 1 or args.repeats < 1 or args.gen_tokens < 2 or args.prompt_tokens < 2:
        p.error("--workers and --repeats must be at least 1, the token counts at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    context = max(4096, args.prompt_tokens + NEW_TOKENS + args.gen_tokens + 16)
    shape = {**(SMALL if args.small else {}), "max_position_embeddings": context}
    model = ensure_model(args.cache_dir, "float32", shape, args.num_layers)
    vocab = 256  # the byte-level tokenizer's ids are safe in any model of the factory
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    model_desc = f"qwen2, {parameter_count(model) / 1e6:.1f}M parameters, float32"
    print(f"model: {model} ({model_desc})", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="pomona-bench-prefill-"))
    processes = Processes(log_dir)
    control = ControlServer()
    single = MlxLm("mlx-lm, 1 process", 1, control)
    clusters = [PomonaCluster(n, step, args.num_layers) for n in args.sizes for step in args.steps]
    load_before = load_average()
    results: dict[str, dict[str, list[float]]] = {}
    with processes.measuring(args.keep_logs, control.close):
        single.start(processes, model, prompt(args.prompt_tokens))
        for c in clusters:
            c.start(processes, model, [])
        for system in (single, *clusters):
            wait_for(f"{system.name} to load", system.ready, 300, system.procs)
        print("all systems loaded; warming up", flush=True)
        single.request(2)
        for c in clusters:
            c.request(2, prompt(600))
        for r in range(args.repeats):
            run = single.request(args.gen_tokens)
            figures = results.setdefault(single.name, {})
            figures.setdefault("ttft", []).append(run.ttft_s)
            figures.setdefault("decode", []).append(run.tps)
            print(f"  round {r + 1}: {single.name}: TTFT {run.ttft_s:.2f} s", flush=True)
            for c in clusters:
                history = prompt(args.prompt_tokens)
                first = c.request(1, history)
                second = c.request(args.gen_tokens, history + prompt(NEW_TOKENS))
                figures = results.setdefault(c.name, {})
                figures.setdefault("ttft", []).append(first.ttft_s)
                figures.setdefault("second", []).append(second.ttft_s)
                figures.setdefault("decode", []).append(second.tps)
                figures.setdefault("cached", []).append(second.cached_tokens)
                print(
                    f"  round {r + 1}: {c.name}: TTFT {first.ttft_s:.2f} s, second turn "
                    f"{second.ttft_s:.3f} s ({second.cached_tokens} cached), "
                    f"{second.tps:.1f} tok/s",
                    flush=True,
                )
        single.stop()
    info = run_info("bench_prefill.py", T0, model_desc, load_before)
    report(args, results, single.name, clusters, info)
    return 0


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, list[float]]],
    single: str,
    clusters: list[PomonaCluster],
    info: dict[str, Any],
) -> None:
    med = {name: {k: statistics.median(v) for k, v in f.items()} for name, f in results.items()}
    base = med[single]
    print()
    print(f"{args.prompt_tokens}-token prompt, medians of {args.repeats} rounds:")
    print(f"  {single}: TTFT {base['ttft']:.2f} s, decode {base['decode']:.1f} tok/s")
    for c in clusters:
        m = med[c.name]
        alone = [o for o in clusters if o.workers == 1 and o.prefill_step == c.prefill_step]
        if alone and alone[0] is not c:
            gain = m["ttft"] / med[alone[0].name]["ttft"]
            print(f"  {c.name}: TTFT {gain:.3f}x Pomona's on 1 worker with the same chunks")
        target = TTFT_TARGETS.get(c.workers, "-")
        print(
            f"  {c.name}: TTFT {m['ttft']:.2f} s ({m['ttft'] / base['ttft']:.3f}x mlx-lm, "
            f"target <= {target}); second turn {m['second']:.3f} s ({m['second'] / m['ttft']:.3f}x "
            f"the first, target <= 0.1; {int(m['cached'])} tokens cached); decode "
            f"{m['decode']:.1f} tok/s ({m['decode'] / base['decode']:.2f}x mlx-lm)"
        )
    print(
        f"load average before / after: {info['load_before']} / {info['load_after']} "
        f"({os.cpu_count()} CPUs): other work on the machine skews the figures"
    )
    print(f"{info['date']}  {info['platform']}  mlx {info['mlx']}  mlx-lm {info['mlx_lm']}")
    print(f"command: {info['command']}")


if __name__ == "__main__":
    sys.exit(main())
