"""Model distribution on the namespace test bed: Pomona's time to first token against
a naive full copy of the model folder to every worker, over links shaped by tc.

The bed has one host per worker plus one for the coordinator. Every worker's link
is shaped both ways to ``--rate`` (tc tbf). Worker 0's model directory holds the
~400 MB benchmark model (float32 qwen2, ``bench_model.py``); the other workers
start with empty model directories and caches.

1. Naive baseline: worker 0's host serves the model folder over plain HTTP
   (``python -m http.server``); every other worker's host downloads the whole
   folder with curl, all at once. Its figure is the wall time until the last
   download ends.
2. Pomona: the same workers run ``pomona worker`` (worker 0 with the model in its
   ``--model-dir``); once every worker answers, has measured its memory
   bandwidth and has its spare runner ready (as a worker daemon started at boot
   has), ``pomona coordinator`` starts on its own host. Its figure
   is the time from starting the coordinator to the first streamed token: planning,
   every receiver fetching its stage from worker 0, loading and the first token.

It reports each receiver's bytes (application payload from the transfer's
progress, and its interface's received bytes) against its share (the sum of its
stage's tensor bytes), and the source link's utilisation while stages were sent.
Needs root and iproute2, like the test bed.

    sudo python bench/bench_distribution.py [--workers 3] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from bench_model import default_cache_dir, ensure_model  # noqa: E402
from clusterkit import coordinator_stub, describe, list_nodes, wait_for  # noqa: E402
from testbed import TestBed, unavailable_reason  # noqa: E402

from pomona.safetensors_layout import read_layout, weight_map  # noqa: E402
from pomona.stage_cache import StageKey, tensors_for_stage  # noqa: E402
from pomona.v1 import common_pb2, coordinator_pb2  # noqa: E402

CLUSTER = "bench"
HTTP_PORT = 8000
RATE_BYTES = {"gbit": 1e9 / 8, "mbit": 1e6 / 8}


def rate_bytes_per_s(rate: str) -> float:
    for unit, scale in RATE_BYTES.items():
        if rate.endswith(unit):
            return float(rate.removesuffix(unit)) * scale
    raise SystemExit(f"--rate {rate!r}: give it as NNNmbit or Ngbit")


def rx_bytes(bed: TestBed, i: int) -> int:
    return int(bed.host(i).check_output(["cat", "/sys/class/net/eth0/statistics/rx_bytes"]))


def naive_copy(bed: TestBed, model: Path, workers: int, root: Path) -> float:
    """Seconds for every worker but 0 to download the whole folder from worker 0 at once."""
    server = bed.host(0).run(
        [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", bed.host(0).ip,
         "--directory", str(model)],
    )  # fmt: skip
    source = f"http://{bed.host(0).ip}:{HTTP_PORT}"

    def answers() -> bool:
        try:
            bed.host(1).check_output(["curl", "-sf", "-o", "/dev/null", source])
        except subprocess.CalledProcessError:
            return False
        return True

    wait_for(answers, 30, "the HTTP server")
    files = sorted(p.name for p in model.iterdir() if p.is_file())
    started = time.monotonic()
    downloads = []
    for i in range(1, workers):
        dest = root / f"naive-{i}"
        dest.mkdir()
        argv = ["curl", "-sf", "--parallel"]
        for name in files:
            argv += ["-o", str(dest / name), f"{source}/{name}"]
        downloads.append(bed.host(i).run(argv))
    for d in downloads:
        if d.wait(timeout=3600) != 0:
            raise SystemExit("a naive download failed")
    seconds = time.monotonic() - started
    server.kill()
    server.wait()
    for i in range(1, workers):
        copied = sum(p.stat().st_size for p in (root / f"naive-{i}").iterdir())
        expected = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
        if copied != expected:
            raise SystemExit(f"naive copy to worker {i}: {copied} of {expected} bytes")
    return seconds


def spares_idle(workers: int) -> bool:
    """Every worker's spare runner started and done importing (its CPU time stands still)."""
    spares = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "--warm" in (p.info["cmdline"] or []) and "pomona.worker.runner" in p.info["cmdline"]
    ]
    if len(spares) < workers:
        return False
    try:
        before = [sum(p.cpu_times()[:2]) for p in spares]
        time.sleep(0.5)
        return all(sum(p.cpu_times()[:2]) - b < 0.02 for p, b in zip(spares, before, strict=True))
    except psutil.Error:
        return False


def shares(model: Path, reply: coordinator_pb2.ListNodesReply) -> dict[str, int]:
    layout = {}
    for file in set(weight_map(model).values()):
        layout.update(read_layout(model / file))
    world = sum(1 for n in reply.nodes if n.shard.end_layer > n.shard.start_layer)
    out = {}
    for n in reply.nodes:
        key = StageKey.of(n.shard.start_layer, n.shard.end_layer, n.shard.rank, world)
        out[n.name] = sum(layout[t].info.nbytes for t in tensors_for_stage(list(layout), key))
    return out


def pomona_run(bed: TestBed, model: Path, workers: int, root: Path, rate: float) -> dict[str, Any]:
    # A model folder may not lead outside its model directory: link its files in.
    held = root / "holder" / model.name
    held.mkdir(parents=True)
    for f in model.iterdir():
        try:
            os.link(f, held / f.name)
        except OSError:
            shutil.copy2(f, held / f.name)
    procs = []
    for i in range(workers):
        empty = root / f"models-{i}"
        empty.mkdir()
        extra = ["--cache-dir", str(root / f"cache-{i}"), "--spare-runner"]
        if i == 0:
            extra += ["--model-dir", str(root / "holder")]
        procs.append(bed.start_worker(i, f"w{i}", CLUSTER, empty, extra=extra))
    for proc in procs:
        # Up and done measuring its memory bandwidth (once per machine, at start).
        wait_for(
            lambda p=proc: describe(p).hardware.HasField("measured_bandwidth_gbs"),
            300,
            f"{proc.name} to settle",
        )
    wait_for(lambda: spares_idle(workers), 120, "the spare runners to finish importing")
    rx_before = {i: rx_bytes(bed, i) for i in range(workers)}
    started = time.monotonic()
    started_wall = time.time()
    coord = bed.start_coordinator(
        workers,
        model.name,
        CLUSTER,
        workers,
        extra=[
            "--objective",
            "throughput",
            "--parallel",
            "pipeline",
            "--state-dir",
            str(root / "coordinator"),
        ],  # fmt: skip
    )
    reply = wait_for(
        lambda: (r := list_nodes(coord)).serving and r, 3600, "the cluster to serve", interval=0.1
    )
    serving_seen = time.monotonic() - started
    stub = coordinator_stub(coord)
    request = common_pb2.GenerateRequest(prompt="The lab has", max_tokens=4)
    first = None
    for chunk in stub.Generate(request, timeout=600):
        if chunk.tokens and first is None:
            first = time.monotonic() - started
    # What in the first token is one-time: the same request again, on the warm cluster.
    sent = time.monotonic()
    again = None
    for chunk in stub.Generate(request, timeout=600):
        if chunk.tokens and again is None:
            again = time.monotonic() - sent
    status = stub.Status(coordinator_pb2.StatusRequest(), timeout=10)
    events = list(stub.Events(coordinator_pb2.EventsRequest(), timeout=10))
    rx_after = {i: rx_bytes(bed, i) for i in range(workers)}
    share = shares(model, reply)
    transfers = {t.name: t.progress for t in status.transfers}
    began = [e.timestamp for e in events if e.kind == "transfer_started"]
    ended = [e.timestamp for e in events if e.kind == "transfer_finished"]
    window = max(ended) - min(began) if began and ended else float("nan")
    received = sum(p.bytes_received for p in transfers.values())
    per_worker = {}
    for i in range(1, workers):
        name = f"w{i}"
        p = transfers.get(name)
        per_worker[name] = {
            "share_bytes": share[name],
            "payload_bytes": p.bytes_received if p else 0,
            "interface_rx_bytes": rx_after[i] - rx_before[i],
            "payload_over_share": (p.bytes_received / share[name]) if p else 0.0,
            "interface_over_share": (rx_after[i] - rx_before[i]) / share[name],
        }
    timeline = [
        f"{e.timestamp - started_wall:6.1f} s  {e.kind:<18} {e.node_name}  {e.message}"
        for e in events
    ]
    return {
        "ttft_from_coordinator_start_s": first,
        "serving_seen_s": serving_seen,
        "second_request_ttft_s": again,
        "timeline": timeline,
        "transfer_window_s": window,
        "bytes_sent_by_source": received,
        "source_link_utilisation": received / window / rate if window == window else None,
        "workers": per_worker,
        "layout": {n.name: [n.shard.start_layer, n.shard.end_layer] for n in reply.nodes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--burst", default="1mb", help="tc tbf burst (bytes: 1mb = 1 MB)")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument(
        "--layers", type=int, default=8, help="Layers of the model (~50 MB each in float32)."
    )
    parser.add_argument("--logs", type=Path, help="Copy the workers' and runners' logs here.")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"the test bed is unavailable: {reason}")
    model = ensure_model(default_cache_dir(), "float32", num_layers=args.layers)
    model_bytes = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    rate = rate_bytes_per_s(args.rate)
    with tempfile.TemporaryDirectory(prefix="pomona-bench-dist-") as tmp:
        root = Path(tmp)
        with TestBed(args.workers + 1, root) as bed:
            for i in range(args.workers):
                bed.throttle(i, rate=args.rate, burst=args.burst, latency="400ms")
            naive = naive_copy(bed, model, args.workers, root)
            result = pomona_run(bed, model, args.workers, root, rate)
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in root.rglob("*.log"):
                shutil.copy2(log, args.logs / "-".join(log.relative_to(root).parts))
    result.update(
        {
            "model_bytes": model_bytes,
            "workers": args.workers,
            "rate": args.rate,
            "naive_copy_s": naive,
            "ttft_over_naive": result["ttft_from_coordinator_start_s"] / naive,
            "per_worker": result.pop("workers"),
        }
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
