"""What `pomona bench` prints: a table, or one JSON document (schema pomona.bench/v1,
field by field in docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from pomona.benchmark import SECOND_TURN_NEW_TOKENS, BenchResult, Figure

SCHEMA = "pomona.bench/v1"


def bench_json(result: BenchResult, header: dict[str, Any], notes: Sequence[str]) -> dict[str, Any]:
    s = result.settings
    settings = {**asdict(s), "concurrency": list(s.concurrency), "temperature": 0.0}
    second = None
    if result.second_turn is not None:
        first, later = result.second_turn.first, result.second_turn.second
        second = {
            "prompt_tokens": s.prompt_tokens,
            "new_tokens": SECOND_TURN_NEW_TOKENS,
            "first_ttft_s": first.to_json(),
            "second_ttft_s": later.to_json(),
            "second_over_first": _over(later.median, first.median),
            "prefix_cache": result.second_turn.cached_tokens > 0,
            "cached_tokens": result.second_turn.cached_tokens,
        }
    return {
        "schema": SCHEMA,
        **header,
        "settings": settings,
        "single_stream": {
            "prompt_tokens": s.prompt_tokens,
            "gen_tokens": s.gen_tokens,
            "ttft_s": result.ttft.to_json(),
            "decode_tokens_per_s": result.decode.to_json(),
            "ended_early": sum(r.ended_early for r in result.runs),
            "runs": [r.to_json() for r in result.runs],
        },
        "sweep": [
            {
                "concurrency": row.concurrency,
                "prompt_tokens": s.sweep_prompt_tokens,
                "gen_tokens": s.gen_tokens,
                "aggregate_tokens_per_s": row.aggregate.to_json(),
                "ttft_s": row.ttft.to_json(),
                "ended_early": row.ended_early,
            }
            for row in result.sweep
        ],
        "second_turn": second,
        "notes": [*notes, *result.notes],
    }


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _seconds(v: float | None) -> str:
    """Three significant digits: 0.000625, 0.0217, 1.23, 45.6, 123."""
    return "n/a" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def print_bench(
    result: BenchResult, header: dict[str, Any], notes: Sequence[str], console: Console
) -> None:
    s = result.settings
    layout = ", ".join(
        f"{st['name']} {st['start_layer']}-{st['end_layer'] - 1}" for st in header["stages"]
    )
    table = Table(
        title=f"{header['model']} on {len(header['stages'])} stages ({layout}) · greedy",
        caption="time in seconds; ratio: measured median / the planner's prediction "
        "(TTFT: above 1 is slower than predicted; tok/s: below 1 is slower)",
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("figure", no_wrap=True)
    for column in ("min", "median", "max", "predicted", "ratio"):
        table.add_column(column, justify="right", no_wrap=True)

    def row(label: str, figure: Figure, fmt: Callable[[float | None], str]) -> None:
        table.add_row(
            label,
            fmt(figure.min),
            fmt(figure.median),
            fmt(figure.max),
            fmt(figure.predicted),
            _ratio(figure.ratio),
        )

    row(f"TTFT, {s.prompt_tokens}-token prompt", result.ttft, _seconds)
    row(f"decode tok/s, {s.gen_tokens} tokens", result.decode, _rate)
    for r in result.sweep:
        streams = "stream" if r.concurrency == 1 else "streams"
        row(f"aggregate tok/s, {r.concurrency} {streams}", r.aggregate, _rate)
    if result.second_turn is not None:
        row(f"TTFT, first turn ({s.prompt_tokens})", result.second_turn.first, _seconds)
        row(
            f"TTFT, second turn (+{SECOND_TURN_NEW_TOKENS})",
            result.second_turn.second,
            _seconds,
        )
    console.print(table)
    repeats = f"{s.repeats} repeat{'s' if s.repeats > 1 else ''}"
    lines = [f"{repeats} of each; prompts of random token ids, seed {s.seed}"]
    if result.sweep:
        lines.append(
            f"sweep: {s.sweep_prompt_tokens}-token prompts, {s.gen_tokens} tokens each; "
            "TTFT median per stream: "
            + ", ".join(f"{r.concurrency}: {_seconds(r.ttft.median)} s" for r in result.sweep)
        )
    if result.second_turn is not None:
        lines.append(
            "second turn / first: "
            + _ratio(_over(result.second_turn.second.median, result.second_turn.first.median))
        )
    lines += [f"note: {n}" for n in (*notes, *result.notes)]
    for line in lines:
        console.print(line, highlight=False)
