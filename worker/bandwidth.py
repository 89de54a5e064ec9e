"""Short speed measurements, for chips the planner's table lacks.

Apple publishes the bandwidth and GPU core count of its chips (pomona/chips.py);
for anything else the worker measures, once per machine, what MLX's default
device reaches streaming a large array (decode's bound) and multiplying square
matrices (prefill's), and remembers both in its state directory. The figures are
the daemon's: a daemon pinned to one core (``taskset``) measures one core, which
is what its runner gets, so the remembered figures are kept per set of cores. Workers
that start together on one machine (``pomona up --local N``) measure in turn, each
alone, as one worker per machine would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BYTES = 256 << 20
REPEATS = 5
MATMUL_MIN = 512
MATMUL_MAX = 8192
# A matmul at least this long is compute-bound (launch and timer overheads are
# noise): on a 2-core CPU that is 512 (~45 ms), on a large GPU 8192 (~2 ms) caps it.
MATMUL_LONG_ENOUGH_S = 0.025
MATMUL_REPEATS = 5


@dataclass(frozen=True)
class Speed:
    """What this machine's default MLX device reached."""

    bandwidth_gbs: float  # GB/s streaming (read and write)
    tflops: float  # dense matmul, in the precision models run in on the device


def _best_seconds(step: Callable[[], Any], repeats: int) -> float:
    import mlx.core as mx

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(step())
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth_gbs(nbytes: int = BYTES, repeats: int = REPEATS) -> float:
    """GB/s of a read-and-write pass over ``nbytes`` (the best of ``repeats``)."""
    import mlx.core as mx

    a = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    return 2 * nbytes / _best_seconds(lambda: a + 1.0, repeats) / 1e9


def matmul_dtype() -> Any:
    """The precision models run in on the default device: bfloat16 on a GPU, float32
    on the CPU (where bfloat16 matmuls are emulated)."""
    import mlx.core as mx

    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def measure_tflops(repeats: int = MATMUL_REPEATS) -> float:
    """Dense matmul TFLOPS of the default device: square matrices doubled from
    ``MATMUL_MIN`` until one product takes ``MATMUL_LONG_ENOUGH_S`` (best of ``repeats``)."""
    import mlx.core as mx

    n = MATMUL_MIN
    while True:
        a = mx.random.normal((n, n)).astype(matmul_dtype())
        b = mx.random.normal((n, n)).astype(matmul_dtype())
        mx.eval(a, b)
        seconds = _best_seconds(lambda: a @ b, repeats)  # noqa: B023 (used at once)
        if seconds >= MATMUL_LONG_ENOUGH_S or n >= MATMUL_MAX:
            return 2 * n**3 / seconds / 1e12
        n *= 2


def measure_speed() -> Speed:
    return Speed(measure_bandwidth_gbs(), measure_tflops())


def device_key() -> dict[str, Any]:
    """What the figures depend on besides the machine: the device and, on a CPU,
    the cores this process may use."""
    import mlx.core as mx

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": str(mx.default_device()), "cpus": cpus}


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Held while measuring: one measurement at a time on this machine."""
    with open(Path(tempfile.gettempdir()) / "pomona-speed.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_speed(
    state_dir: Path, fingerprint: str, measure: Callable[[], Speed] = measure_speed
) -> Speed:
    """This machine's measured speed, measured on first use (and again where the
    remembered one was made on another machine, device or set of cores, or lacks a figure)."""
    path = state_dir / "bandwidth.json"
    key = {"fingerprint": fingerprint, **device_key()}
    try:
        data = json.loads(path.read_text())
        if all(data.get(k) == v for k, v in key.items()):
            return Speed(float(data["gbs"]), float(data["tflops"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with _machine_lock():
        speed = measure()
    log.info(
        "measured memory bandwidth %.1f GB/s, matmul %.3g TFLOPS",
        speed.bandwidth_gbs,
        speed.tflops,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**key, "gbs": speed.bandwidth_gbs, "tflops": speed.tflops}))
    tmp.replace(path)
    return speed
