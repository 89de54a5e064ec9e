"""A short memory-bandwidth measurement, for chips the planner's table lacks.

Apple publishes the bandwidth of its chips (pomona/chips.py); for anything
else the worker measures what MLX's default device reaches streaming a
large array, once per machine, and remembers it in its state directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

BYTES = 256 << 20
REPEATS = 5


def measure_bandwidth_gbs(nbytes: int = BYTES, repeats: int = REPEATS) -> float:
    """GB/s of a read-and-write pass over ``nbytes`` (the best of ``repeats``)."""
    import mlx.core as mx

    a = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b = a + 1.0
        mx.eval(b)
        best = min(best, time.perf_counter() - start)
        del b
    return 2 * nbytes / best / 1e9


def cached_bandwidth_gbs(state_dir: Path, fingerprint: str) -> float:
    """The measured bandwidth of this machine, measured on first use."""
    path = state_dir / "bandwidth.json"
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") == fingerprint:
            return float(data["gbs"])
    except (OSError, ValueError, KeyError):
        pass
    gbs = measure_bandwidth_gbs()
    log.info("measured memory bandwidth: %.1f GB/s", gbs)
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint, "gbs": gbs}))
    return gbs
