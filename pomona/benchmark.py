"""Timing generations of a running cluster from the client's side, and summing them up.

Every request is greedy and sends its prompt as token ids, so its length is exact. A
stream's times are taken when its chunks arrive here: TTFT runs from sending the
request to the first token; decode tok/s is (tokens - 1) / (last token - first token),
so the prefill is not in it.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pomona import rpc
from pomona.v1 import common_pb2, coordinator_pb2_grpc

FINISH_REASONS = {
    common_pb2.FINISH_REASON_UNSPECIFIED: "",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """``length`` token ids drawn uniformly from the vocabulary."""
    return [rng.randrange(vocab_size) for _ in range(length)]


@dataclass(frozen=True)
class StreamTiming:
    """One generation as the client saw it; times are `time.perf_counter()` seconds."""

    sent: float
    first: float | None  # arrival of the first token; None: no token came
    last: float | None
    tokens: int
    max_tokens: int
    finish_reason: str
    cached_tokens: int = 0  # prompt tokens the prefix cache restored

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def ended_early(self) -> bool:
        """The model ended before max_tokens (Pomona has no ignore_eos)."""
        return self.tokens < self.max_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "ttft_s": self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "ended_early": self.ended_early,
            "cached_tokens": self.cached_tokens,
        }


def aggregate_tokens_per_s(streams: Sequence[StreamTiming]) -> float | None:
    """Decode tokens/s of streams run together: sum of (tokens - 1) over the time from the
    first token of any stream to the last token of any (as bench/bench_concurrency.py)."""
    timed = [s for s in streams if s.first is not None and s.last is not None]
    if not timed:
        return None
    span = max(s.last for s in timed if s.last is not None) - min(
        s.first for s in timed if s.first is not None
    )
    tokens = sum(max(s.tokens - 1, 0) for s in timed)
    return tokens / span if span > 0 and tokens > 0 else None


@dataclass(frozen=True)
class Figure:
    """Repeated measurements of one figure, and the planner's prediction of it."""

    values: tuple[float, ...]
    predicted: float | None = None

    @property
    def min(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def max(self) -> float | None:
        return max(self.values) if self.values else None

    @property
    def ratio(self) -> float | None:
        """Measured (median) / predicted."""
        median = self.median
        if median is None or not self.predicted:
            return None
        return median / self.predicted

    @classmethod
    def of(cls, values: Iterable[float | None], predicted: float | None = None) -> Figure:
        """The figure of the values that were measured (None: not measured)."""
        return cls(tuple(v for v in values if v is not None), predicted)

    def to_json(self) -> dict[str, Any]:
        return {
            "min": self.min,
            "median": self.median,
            "max": self.max,
            "predicted": self.predicted,
            "ratio": self.ratio,
            "values": list(self.values),
        }


class Streamer:
    """Sends greedy generations through the coordinator and times them; `cancel` ends
    every call in flight (Ctrl-C, or one stream of a round failed)."""

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, seed: int) -> None:
        self._stub = stub
        self._seed = seed
        self._calls: set[Any] = set()
        self._lock = threading.Lock()

    def one(self, prompt: Sequence[int], max_tokens: int) -> StreamTiming:
        request = common_pb2.GenerateRequest(
            prompt_tokens=list(prompt),
            max_tokens=max_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0, seed=self._seed),
        )
        sent = time.perf_counter()
        call = self._stub.Generate(request, timeout=rpc.GENERATE_TIMEOUT)
        with self._lock:
            self._calls.add(call)
        first = last = None
        tokens, finish, cached = 0, common_pb2.FINISH_REASON_UNSPECIFIED, 0
        try:
            for chunk in call:
                if chunk.tokens:
                    last = time.perf_counter()
                    first = last if first is None else first
                    tokens += len(chunk.tokens)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                if chunk.HasField("usage"):
                    cached = chunk.usage.cached_tokens
        finally:
            with self._lock:
                self._calls.discard(call)
        reason = FINISH_REASONS.get(finish, "")
        return StreamTiming(sent, first, last, tokens, max_tokens, reason, cached)

    def together(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[StreamTiming]:
        """One stream per prompt, all sent at once."""
        if len(prompts) == 1:
            return [self.one(prompts[0], max_tokens)]
        start = threading.Barrier(len(prompts))

        def run(prompt: Sequence[int]) -> StreamTiming:
            start.wait()
            return self.one(prompt, max_tokens)

        with ThreadPoolExecutor(len(prompts), thread_name_prefix="bench-stream") as pool:
            futures = [pool.submit(run, p) for p in prompts]
            try:
                return [f.result() for f in futures]
            except BaseException:
                start.abort()
                self.cancel()
                raise

    def cancel(self) -> None:
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()


# ---- the protocol ----------------------------------------------------------------------

SECOND_TURN_NEW_TOKENS = 64
WARMUP_PROMPT_TOKENS = 16
WARMUP_GEN_TOKENS = 2


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 4096
    gen_tokens: int = 128
    repeats: int = 3
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    sweep_prompt_tokens: int = 128
    second_turn: bool = False
    seed: int = 0

    @property
    def steps(self) -> int:
        """Steps of the progress bar: the warm-up, each request or round of streams."""
        rounds = self.repeats * (1 + len(self.concurrency) + 2 * self.second_turn)
        return 1 + rounds

    def context_needed(self) -> list[tuple[str, int]]:
        """What each part needs of the context: (what, prompt + generated tokens)."""
        out = [(f"a {self.prompt_tokens}-token prompt + {self.gen_tokens} tokens", self.single)]
        if self.concurrency:
            out.append(
                (
                    f"a {self.sweep_prompt_tokens}-token sweep prompt + {self.gen_tokens} tokens",
                    self.sweep_prompt_tokens + self.gen_tokens,
                )
            )
        if self.second_turn:
            out.append(
                (
                    f"a second turn of {self.prompt_tokens} + {SECOND_TURN_NEW_TOKENS} tokens",
                    self.prompt_tokens + SECOND_TURN_NEW_TOKENS + 1,
                )
            )
        return out

    @property
    def single(self) -> int:
        return self.prompt_tokens + self.gen_tokens


@dataclass(frozen=True)
class Predicted:
    """The planner's figures for one shape of request on the serving plan."""

    ttft_s: float
    decode_tokens_per_s: float
    aggregate_tokens_per_s: float


# (prompt tokens, tokens in the KV cache, streams) -> the planner's figures, or None
Predictor = Callable[[int, int, int], Predicted | None]


@dataclass(frozen=True)
class SweepRow:
    concurrency: int
    aggregate: Figure  # tok/s of all streams together, one value per round
    ttft: Figure  # every stream's
    ended_early: int  # streams that ended before gen_tokens


@dataclass(frozen=True)
class SecondTurn:
    first: Figure
    second: Figure
    cached_tokens: int = 0  # the least any second turn restored from the prefix cache


@dataclass(frozen=True)
class BenchResult:
    settings: BenchSettings
    runs: tuple[StreamTiming, ...]
    ttft: Figure
    decode: Figure
    sweep: tuple[SweepRow, ...]
    second_turn: SecondTurn | None
    notes: tuple[str, ...]


def run_bench(
    streamer: Streamer,
    settings: BenchSettings,
    vocab_size: int,
    predictor: Predictor,
    step: Callable[[str], None],
) -> BenchResult:
    """Apple's protocol, then the concurrency sweep, then the second turn.

    Every request has a prompt of its own (drawn from one seeded generator), so no two
    share a prefix except the second turn's, which is the point of it. ``step`` is called
    before each request or round of streams, with what it is.
    """
    s, rng = settings, random.Random(settings.seed)
    notes: list[str] = []

    def prompt(length: int) -> list[int]:
        return random_prompt(rng, length, vocab_size)

    step("warm-up")
    streamer.one(prompt(min(WARMUP_PROMPT_TOKENS, s.prompt_tokens)), WARMUP_GEN_TOKENS)
    runs = []
    for i in range(s.repeats):
        step(f"{s.prompt_tokens}-token prompt, {s.gen_tokens} tokens ({i + 1}/{s.repeats})")
        runs.append(streamer.one(prompt(s.prompt_tokens), s.gen_tokens))
    single = predictor(s.prompt_tokens, s.single, 1)
    full = [r for r in runs if not r.ended_early]
    early = len(runs) - len(full)
    if early:
        notes.append(
            f"{early} of {len(runs)} runs ended before {s.gen_tokens} tokens (an end of "
            "sequence; Pomona has no ignore_eos): "
            + ("their decode rates are left out" if full else "decode is over what they made")
        )
    decode = Figure.of(
        (r.decode_tokens_per_s for r in full or runs),
        single.decode_tokens_per_s if single else None,
    )
    ttft = Figure.of((r.ttft_s for r in runs), single.ttft_s if single else None)

    sweep = []
    for n in s.concurrency:
        rounds = []
        for i in range(s.repeats):
            step(f"{n} streams of {s.sweep_prompt_tokens}-token prompts ({i + 1}/{s.repeats})")
            rounds.append(
                streamer.together([prompt(s.sweep_prompt_tokens) for _ in range(n)], s.gen_tokens)
            )
        shape = predictor(s.sweep_prompt_tokens, s.sweep_prompt_tokens + s.gen_tokens, n)
        sweep.append(
            SweepRow(
                n,
                Figure.of(
                    (aggregate_tokens_per_s(r) for r in rounds),
                    shape.aggregate_tokens_per_s if shape else None,
                ),
                Figure.of(t.ttft_s for r in rounds for t in r),
                sum(t.ended_early for r in rounds for t in r),
            )
        )
        if sweep[-1].ended_early:
            notes.append(
                f"{sweep[-1].ended_early} of {n * s.repeats} streams at {n} ended early: "
                "the aggregate counts the tokens they made"
            )

    second = None
    if s.second_turn:
        firsts, seconds, cached = [], [], []
        for i in range(s.repeats):
            history = prompt(s.prompt_tokens)
            step(f"first turn, {s.prompt_tokens} tokens ({i + 1}/{s.repeats})")
            firsts.append(streamer.one(history, 1).ttft_s)
            step(f"second turn, +{SECOND_TURN_NEW_TOKENS} tokens ({i + 1}/{s.repeats})")
            turn = streamer.one(history + prompt(SECOND_TURN_NEW_TOKENS), 1)
            seconds.append(turn.ttft_s)
            cached.append(turn.cached_tokens)
        longer = s.prompt_tokens + SECOND_TURN_NEW_TOKENS
        restored = min(cached, default=0)
        one, two = (
            predictor(s.prompt_tokens, s.prompt_tokens + 1, 1),
            predictor(longer - restored, longer + 1, 1),
        )
        second = SecondTurn(
            Figure.of(firsts, one.ttft_s if one else None),
            Figure.of(seconds, two.ttft_s if two else None),
            restored,
        )
        if restored:
            notes.append(
                f"second turn: the prefix cache restored {restored} of {longer} prompt "
                f"tokens; the prediction prefills the other {longer - restored} (attention "
                "over the restored ones not counted)"
            )
        else:
            notes.append(
                "second turn: no prefix-cache hit (the cache is off or too small), so the "
                f"second turn prefilled all {longer} tokens again (the prediction assumes the same)"
            )
    return BenchResult(s, tuple(runs), ttft, decode, tuple(sweep), second, tuple(notes))
