"""One rank of a direct measurement of MLX's ring all_sum between two processes.

``bench_tensor.py`` starts two of these (pinned to cores 0 and 1, each in a
session of its own, ``MLX_RANK`` and ``MLX_HOSTFILE`` set as Pomona's workers
set them); rank 0 prints the mean seconds of one ``all_sum`` of ``--width``
float32 values (one decode token's hidden state), each evaluated on its own as
a tensor parallel layer does.

    python bench/collective_probe.py --width 1024 --count 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_lm_rank import own_session, pin_to_rank_core  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--count", type=int, default=2000)
    args = p.parse_args()
    own_session()
    pin_to_rank_core()
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    x = mx.ones((1, args.width), dtype=mx.float32)
    for _ in range(50):  # warm-up
        mx.eval(mx.distributed.all_sum(x))
    start = time.perf_counter()
    for _ in range(args.count):
        x = mx.distributed.all_sum(x) * 0.5
        mx.eval(x)
    seconds = (time.perf_counter() - start) / args.count
    if group.rank() == 0:
        print(json.dumps({"all_sum_s": seconds, "width": args.width, "ranks": group.size()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
