"""One mlx-lm process of the decode benchmark.

Started by ``bench_decode.py`` either alone (single-process mlx-lm) or under
``mlx.launch --backend ring -n 2`` as one rank of mlx-lm's own pipeline
(``sharded_load`` with a pipeline group). Each process pins itself to the core
of its rank *before* MLX is imported, so that MLX's threads inherit the
affinity: a rank stands for one Mac and must not borrow its peer's core.

Once loaded, the process connects to the benchmark's control socket and waits
there (idle, not inside an MLX collective, so it takes no CPU) for requests:
one JSON line ``{"max_tokens": N}`` per request, or ``{"exit": true}``. Every
rank decodes each request in lockstep; each answers with one JSON line, rank
0's holding the tokens and timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from typing import Any


def own_session() -> None:
    """Leave mlx.launch's session for one of this rank's own; die with the launcher.

    On Linux each session is a scheduler autogroup, and CFS shares a contended
    core between autogroups: two ranks in one session are scheduled unlike two
    Pomona runners, each of which its worker starts in a session of its own.
    Each rank in its own session (the single process already is) keeps the
    comparison fair. PR_SET_PDEATHSIG keeps the rank from outliving mlx.launch.
    """
    if not hasattr(os, "setsid"):
        return
    with contextlib.suppress(OSError):  # already a session leader when run alone
        os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pin_to_rank_core() -> int:
    """Pin this process to core ``MLX_RANK`` (0 when run alone); return the rank."""
    rank = int(os.environ.get("MLX_RANK", "0"))
    pin = os.environ.get("POMONA_BENCH_NO_PIN") != "1"  # --no-pin: on a GPU machine
    if pin and hasattr(os, "sched_setaffinity"):  # Linux; macOS has no CPU affinity
        os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})
    return rank


def decode_timing(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy-decode one request; the generated tokens and their arrival times.

    Decode time runs from the first token to the last (prefill excluded), as
    the Pomona client measures it: tokens/s = (tokens - 1) / that time.
    """
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.generate import generation_stream
    from mlx_lm.sample_utils import make_sampler

    tokens: list[int] = []
    stamps: list[float] = []
    start = time.perf_counter()
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)
    ):
        if response.finish_reason == "stop":  # the EOS token, not a generated one
            break
        stamps.append(time.perf_counter())
        tokens.append(int(response.token))
    # generate_step has already queued the step after the last token; let it
    # finish so that it neither overlaps the next measurement nor strands a peer.
    mx.synchronize(generation_stream)
    return {"tokens": tokens, "stamps": [t - start for t in stamps]}


def main(argv: list[str] | None = None) -> int:
    own_session()
    rank = pin_to_rank_core()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-tokens", required=True, help="comma-separated token ids")
    parser.add_argument("--control", required=True, help="HOST:PORT of the benchmark")
    parser.add_argument("--system", required=True, help="name to announce on the control socket")
    parser.add_argument("--pipeline", action="store_true", help="load with mlx-lm's pipeline")
    args = parser.parse_args(argv)

    import mlx.core as mx  # after pinning: MLX's threads inherit the affinity
    from mlx_lm import load
    from mlx_lm.utils import sharded_load

    if args.pipeline:
        group = mx.distributed.init(strict=True)
        loaded = sharded_load(args.model, pipeline_group=group)
        model, tokenizer = loaded[0], loaded[1]
    else:
        group = None
        loaded = load(args.model)
        model, tokenizer = loaded[0], loaded[1]
    prompt = [int(t) for t in args.prompt_tokens.split(",")]

    host, port = args.control.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn, conn.makefile("rw") as ctl:
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        hello = {"system": args.system, "rank": rank, "pid": os.getpid(), "affinity": affinity}
        ctl.write(json.dumps(hello) + "\n")
        ctl.flush()
        for line in ctl:
            command = json.loads(line)
            if command.get("exit"):
                break
            run = decode_timing(model, tokenizer, prompt, int(command["max_tokens"]))
            ctl.write(json.dumps(run if rank == 0 else {"done": True}) + "\n")
            ctl.flush()
    if group is not None:  # leave together: a rank that exits early breaks its peer's socket
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
