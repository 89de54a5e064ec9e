"""Pomona clusters of 2 and 3 local workers at a real model shape, on one accelerator.

Run on a machine with MLX's GPU build (the lent H200 runs MLX's CUDA build):
it writes a random-weight model with the layer shapes of a real one (the
layers are real; the vocabulary is the test tokenizer's, so the embedding and
head are small), brings up ``pomona up --local N`` for each N, runs
``pomona bench --json`` against it (Apple's protocol and a concurrency sweep),
runs ``mlx_lm.benchmark`` in one process on the same folder, and prints the
figures side by side with their ratios. Greedy token equality is checked on
CPU by the test suite (repeated GPU runs are not bit-identical).

    python bench/gpu_cluster.py --config ../shared/model-configs/llama-3.1-8b.json \\
        --workers 2,3 --out /tmp/gpu-figures

The Llama-3.1-70B shape in 4-bit (80 layers, ~38 GB), split evenly:

    python bench/gpu_cluster.py --config ../shared/model-configs/llama-3.1-70b.json \\
        --layers 80 --bits 4 --workers 2 --split
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "rms_norm_eps", "rope_theta", "hidden_act")  # fmt: skip


def ensure_model(
    config: Path, folder: Path, layers: int, dtype: str, bits: int = 0, model_type: str = ""
) -> Path:
    """A random-weight model of ``config``'s layer shape, ``bits``-quantized if asked, as
    ``model_type`` if given (mlx-lm's own pipeline takes qwen2 but not llama)."""
    if (folder / "tokenizer.json").exists():
        return folder
    sys.path.insert(0, str(REPO / "tests"))
    from modelfactory import make_model

    real = json.loads(config.read_text())
    overrides = {k: real[k] for k in KEPT if k in real}
    overrides["max_position_embeddings"] = 8192
    make_model(folder, model_type or real["model_type"], num_layers=layers,
               shards=max(1, layers // 4), dtype=dtype, overrides=overrides, bits=bits,
               group_size=64)  # fmt: skip
    return folder


def run_cluster(model: Path, workers: int, args: argparse.Namespace, port: int) -> dict:
    env = dict(os.environ, XDG_STATE_HOME=str(args.out / f"state-{workers}"))
    up = subprocess.Popen(
        [sys.executable, "-m", "pomona", "up", "--local", str(workers), "--model", str(model),
         "--port", str(port), "--http-port", "0", "--parallel", "pipeline",
         *(["--layers", split(args.layers, workers)] if args.split else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        if not line.startswith("Pomona is up"):
            raise RuntimeError(f"pomona up --local {workers} failed: {line}")
        started = time.monotonic()
        bench = subprocess.run(
            [sys.executable, "-m", "pomona", "bench", "--coordinator", f"127.0.0.1:{port}",
             "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
             "--repeats", str(args.repeats), "--concurrency", args.concurrency, "--json",
             *(["--second-turn"] if args.second_turn else [])],
            capture_output=True, text=True, env=env, timeout=args.timeout,
        )  # fmt: skip
        if bench.returncode != 0:
            raise RuntimeError(f"pomona bench failed: {bench.stderr}")
        result = json.loads(bench.stdout)
        result["bench_wall_s"] = round(time.monotonic() - started, 1)
        return result
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)


def split(layers: int, workers: int) -> str:
    """Layers per worker, as even as they go (``--layers`` of ``pomona up``)."""
    return ",".join(str(layers // workers + (i < layers % workers)) for i in range(workers))


def run_mlx_lm(model: Path, args: argparse.Namespace) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm.benchmark", "--model", str(model),
         "-p", str(args.prompt_tokens), "-g", str(args.gen_tokens), "-n", str(args.repeats)],
        capture_output=True, text=True, timeout=args.timeout,
    )  # fmt: skip
    return out.stdout + out.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bits", type=int, default=0, help="quantize the weights (4 or 8)")
    parser.add_argument(
        "--model-type",
        default="",
        help="write the layers as this architecture (qwen2: for mlx-lm's pipeline, which "
        "refuses llama)",
    )
    parser.add_argument(
        "--write-only",
        action="store_true",
        help="write the model, print its folder and stop (for bench_decode.py --model)",
    )
    parser.add_argument("--workers", default="2,3")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/pomona-gpu-model"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/pomona-gpu-figures"))
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument(
        "--split",
        action="store_true",
        help="Split the layers evenly over the workers (the planner may put a model that "
        "fits one GPU on one worker).",
    )
    parser.add_argument("--second-turn", action="store_true", help="Also time a chat's next turn.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    name = f"{args.config.stem}-l{args.layers}" + (f"-q{args.bits}" if args.bits else "")
    name += f"-{args.model_type}" if args.model_type else ""
    model = ensure_model(args.config, args.model_dir / name, args.layers, args.dtype, args.bits,
                         args.model_type)  # fmt: skip
    print(f"model ready in {time.monotonic() - t0:.0f} s: {model}", flush=True)
    if args.write_only:
        return 0
    results = {}
    for i, n in enumerate(int(x) for x in args.workers.split(",")):
        results[n] = run_cluster(model, n, args, 40100 + 10 * i)
        (args.out / f"pomona-{n}.json").write_text(json.dumps(results[n], indent=1))
        print(f"{n} workers: {json.dumps(results[n])[:1500]}", flush=True)
    if not args.skip_mlx_lm:
        text = run_mlx_lm(model, args)
        (args.out / "mlx_lm.txt").write_text(text)
        print("mlx_lm.benchmark, one process:\n" + text[-1500:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
