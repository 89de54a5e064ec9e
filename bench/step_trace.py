"""Summarise the step traces runners write under ``POMONA_STEP_TRACE=DIR``.

    POMONA_STEP_TRACE=/tmp/trace python bench/bench_decode.py ...
    python bench/step_trace.py /tmp/trace

For every request the client made (``client.tsv``): its time to first token,
split into the time before the head's first step, each rank's prefill steps
(count, seconds computing, seconds waiting for the previous rank), the time
from the last prefill step to the first token, and the decode steps' mean
seconds per step on every rank.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


def load(path: Path) -> list[tuple[float, float, str, int, int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        a, b, kind, tokens, lane, chained = line.split("\t")
        rows.append((float(a), float(b), kind, int(tokens), int(lane), int(chained)))
    return rows


def main(folder: str) -> None:
    root = Path(folder)
    ranks = {int(p.stem[4:]): load(p) for p in sorted(root.glob("rank*.tsv"))}
    clients = [
        tuple(map(float, line.split("\t")))
        for line in (root / "client.tsv").read_text().splitlines()
    ]
    for began, ttft, last, count in clients:
        end = began + last
        print(
            f"request at {began:.3f}: TTFT {ttft * 1e3:.1f} ms, {int(count)} tokens, "
            f"decode {(last - ttft) / max(count - 1, 1) * 1e3:.2f} ms/token"
        )
        first_token = began + ttft
        for rank, rows in sorted(ranks.items()):
            mine = [r for r in rows if began <= r[0] <= end]
            if not mine:
                continue
            pre = [r for r in mine if r[2] == "prefill"]
            waits = [r for r in mine if r[2] == "wait" and r[0] < first_token]
            dec = [r for r in mine if r[2] in ("decode", "verify") and r[0] > first_token]
            col = [r for r in mine if r[2] == "collect" and r[0] > first_token]
            line = f"  rank {rank}: first step +{(mine[0][0] - began) * 1e3:.1f} ms"
            if pre:
                line += (
                    f"; {len(pre)} prefill steps {sum(r[1] - r[0] for r in pre) * 1e3:.1f} ms"
                    f" (+{(pre[0][0] - began) * 1e3:.1f} .. +{(pre[-1][1] - began) * 1e3:.1f})"
                )
            if waits:
                waited = sum(r[1] - r[0] for r in waits) * 1e3
                line += f"; waited {waited:.1f} ms before the first token"
            if dec:
                line += f"; decode {statistics.mean(r[1] - r[0] for r in dec) * 1e3:.2f} ms/step"
                line += f" ({sum(r[5] for r in dec)}/{len(dec)} chained)"
            if col:
                line += f"; collect {statistics.mean(r[1] - r[0] for r in col) * 1e3:.2f} ms"
            print(line)


if __name__ == "__main__":
    main(sys.argv[1])
