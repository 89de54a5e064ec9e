"""Clusters of the shapes users build: 2 to 5 workers, any names, any order.

Each worker count draws its own shape from a seed: the architecture and half
precision dtype of the model, the workers' names (two Macs may share one) and
node ids (which set the ring order), the order the workers start in, and either
an uneven ``--layers`` split or the planner's own. Every worker and the
coordinator start through the ``pomona`` CLI and find each other over mDNS on
loopback; the runners form a real MLX ring. Short prompts and prompts of many
16-token prefill chunks run concurrently, over gRPC and HTTP, and every one
must get single-process mlx-lm's greedy tokens.

The seed of a shape is ``POMONA_TEST_SEED`` (default ``BASE_SEED``) plus the
worker count; every failure message starts with it, so that
``POMONA_TEST_SEED=<base> pytest tests/test_cluster_shapes.py`` replays it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from clusterkit import (
    LocalCluster,
    Proc,
    coordinator_stub,
    local_cluster,
    reference_tokens_of,
    wait_serving,
)
from modelfactory import ARCHITECTURES, CORPUS, make_model

from pomona.local import free_port_pair
from pomona.v1 import common_pb2
from pomona.worker.identity import machine_fingerprint

pytestmark = pytest.mark.cluster

BASE_SEED = 1624
PREFILL_STEP = 16
MAX_TOKENS = 12
REQUEST_TIMEOUT_S = 60.0
# What people call their Macs: spaces, apostrophes, dots, non-ASCII, and the
# same default name on two machines.
NAMES = [
    "Mac mini",
    "Mac mini",
    "Ana's MacBook Pro",
    "studio-2",
    "Mac Studio (3)",
    "café-mini",
    "m4.lab",
    "LAB-MINI-7",
    "ミニ",
]
SHORT_PROMPTS = ["The lab has four machines and", "Tokens flow"]
# MLX's CPU backend multiplies gathered experts in float32 only
# ("[GatherMM::eval] Currently only supports float32"): no MoE in half here.
HALF_PRECISION_ARCHITECTURES = sorted(a for a in ARCHITECTURES if "moe" not in a)


def base_seed() -> int:
    return int(os.environ.get("POMONA_TEST_SEED", BASE_SEED))


@dataclass(frozen=True)
class Shape:
    base: int
    workers: int
    arch: str
    dtype: str
    num_layers: int
    layers: tuple[int, ...]  # empty: the planner's split
    names: tuple[str, ...]
    node_ids: tuple[str, ...]
    start_order: tuple[int, ...]  # indices into names / node_ids
    long_prompt_tokens: tuple[int, ...]
    bits: int = 0  # quantized weights (mlx_lm.convert -q), as labs run big models

    @property
    def seed(self) -> int:
        return self.base + self.workers

    def __str__(self) -> str:
        split = ",".join(map(str, self.layers)) if self.layers else "the planner's"
        workers = ", ".join(f"{self.names[i]!r}={self.node_ids[i]}" for i in self.start_order)
        return (
            f"[seed {self.seed}: POMONA_TEST_SEED={self.base}] {self.workers} workers, "
            f"{self.arch} {self.dtype}{f' {self.bits}-bit' if self.bits else ''}, "
            f"{self.num_layers} layers, split {split}, "
            f"started in order {workers}"
        )


def draw_shape(workers: int, base: int) -> Shape:
    rng = random.Random(base + workers)
    num_layers = workers + rng.randint(1, 3)
    layers: tuple[int, ...] = ()
    if rng.random() < 0.5:
        while not layers or len(set(layers)) == 1:
            cuts = sorted(rng.sample(range(1, num_layers), workers - 1))
            layers = tuple(b - a for a, b in zip([0, *cuts], [*cuts, num_layers], strict=True))
    return Shape(
        base=base,
        workers=workers,
        arch=rng.choice(HALF_PRECISION_ARCHITECTURES),
        dtype=rng.choice(["float16", "bfloat16"]),
        num_layers=num_layers,
        layers=layers,
        names=tuple(rng.choice(NAMES) for _ in range(workers)),
        node_ids=tuple(f"{rng.getrandbits(48):012x}" for _ in range(workers)),
        start_order=tuple(rng.sample(range(workers), workers)),
        long_prompt_tokens=tuple(rng.randint(100, 200) for _ in range(3)),
        bits=rng.choice((0, 4, 8)),  # drawn last: the seeds' other draws stay as they were
    )


@contextlib.contextmanager
def replayable(shape: Shape) -> Iterator[None]:
    """Every failure names the seed that replays it."""
    try:
        yield
    except AssertionError as e:
        if str(shape.seed) in str(e):
            raise
        raise AssertionError(f"{shape}\n{e}") from e
    except Exception as e:
        raise AssertionError(f"{shape}\n{type(e).__name__}: {e}") from e


def long_prompts(model: Path, shape: Shape) -> list[str]:
    """Prompts of at least the drawn token counts: many prefill chunks each."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    rng = random.Random(shape.seed)
    words = CORPUS.split()
    prompts = []
    for target in shape.long_prompt_tokens:
        text = f"Prompt {target}:"
        while len(tokenizer.encode(text)) < target:
            text += " " + rng.choice(words)
        prompts.append(text)
    return prompts


def start_workers(c: LocalCluster, shape: Shape) -> list[Proc]:
    """The workers in the drawn start order, each with its drawn node id."""
    fingerprint = machine_fingerprint()
    procs = []
    for i in shape.start_order:
        key = f"w{i}"
        state = c.state_dir(key)
        state.mkdir(parents=True)
        node = {"node_id": shape.node_ids[i], "fingerprint": fingerprint}
        (state / "node.json").write_text(json.dumps(node))
        procs.append(c.worker(shape.names[i], key=key))
    return procs


def grpc_client(coord: Proc, prompt: str) -> tuple[list[int], common_pb2.GenerateChunk]:
    request = common_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        sampling=common_pb2.SamplingParams(temperature=0.0),
    )
    tokens: list[int] = []
    last = None
    for chunk in coordinator_stub(coord).Generate(request, timeout=REQUEST_TIMEOUT_S):
        tokens.extend(chunk.tokens)
        last = chunk
    assert last is not None, "the stream ended without a chunk"
    return tokens, last


def run_together(clients: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run every client in its own thread, released at once; errors are results."""
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(clients))

    def run(key: str, client: Callable[[], object]) -> None:
        try:
            barrier.wait(30)
            results[key] = client()
        except Exception as e:  # compared below, with the seed
            results[key] = e

    threads = [threading.Thread(target=run, args=item) for item in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S + 60)
    return results


def streamed_text(tokenizer: Any, tokens: list[int]) -> str:
    """The text mlx-lm streams for ``tokens`` (its BPE detokenizer drops the
    first token's leading space, where ``tokenizer.decode`` keeps it)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return str(detokenizer.text)


def _error(value: object) -> str:
    if isinstance(value, grpc.RpcError):
        return f"{value.code()}: {value.details()}"
    return f"{type(value).__name__}: {value}"


@pytest.mark.parametrize("workers", [2, 3, 4, 5])
def test_any_shape_of_cluster_gives_single_process_greedy_tokens(
    tmp_path: Path, workers: int
) -> None:
    from mlx_lm.utils import load_tokenizer

    shape = draw_shape(workers, base_seed())
    print(shape)
    with replayable(shape):
        model = make_model(
            tmp_path / shape.arch,
            shape.arch,
            num_layers=shape.num_layers,
            shards=3,
            seed=shape.seed,
            dtype=shape.dtype,
            bits=shape.bits,
        )
        tokenizer = load_tokenizer(model)
        long = long_prompts(model, shape)
        prompts = [*SHORT_PROMPTS, *long]
        expected = reference_tokens_of(model, prompts, MAX_TOKENS)
        with local_cluster(tmp_path) as c:
            http_port = free_port_pair(c.taken)
            start_workers(c, shape)
            coord = c.coordinator(
                str(model),
                min_workers=workers,
                layers=",".join(map(str, shape.layers)),
                http_port=http_port,
                extra=("--prefill-step", str(PREFILL_STEP)),
            )
            reply = wait_serving(coord, timeout=180)

            assert sorted(n.node_id for n in reply.nodes) == sorted(shape.node_ids), shape
            assert sorted(n.name for n in reply.nodes) == sorted(shape.names), shape
            held = sorted((n.shard.start_layer, n.shard.end_layer) for n in reply.nodes)
            bounds = [0, *(end for _, end in held)]
            assert held == list(zip(bounds, bounds[1:], strict=False)), f"{shape}: {held}"
            assert bounds[-1] == shape.num_layers, f"{shape}: {held}"
            assert all(start < end for start, end in held), f"{shape}: an idle worker: {held}"
            if shape.layers:
                assert tuple(e - s for s, e in held) == shape.layers, f"{shape}: {held}"

            http = openai.OpenAI(
                base_url=f"http://127.0.0.1:{http_port}/v1",
                api_key="unused",
                timeout=REQUEST_TIMEOUT_S,
                max_retries=0,
            )
            clients: dict[str, Callable[[], object]] = {
                f"grpc {i}": (lambda p=p: grpc_client(coord, p)) for i, p in enumerate(prompts)
            }
            clients["http"] = lambda: http.completions.create(
                model=shape.arch,
                prompt=long[0],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            results = run_together(clients)

            errors = {k: _error(v) for k, v in results.items() if isinstance(v, Exception)}
            errors.update({k: "still running" for k in clients if k not in results})
            assert not errors, f"{shape}: {errors}"
            for i, prompt in enumerate(prompts):
                tokens, last = results[f"grpc {i}"]  # type: ignore[misc]
                want = expected[prompt]
                assert tokens == want, f"{shape}: {prompt[:40]!r}…: {tokens} != {want}"
                n_prompt = len(tokenizer.encode(prompt))
                assert last.usage.prompt_tokens == n_prompt, f"{shape}: {last.usage}"
                assert last.usage.completion_tokens == len(want), f"{shape}: {last.usage}"
            assert min(len(tokenizer.encode(p)) for p in long) >= 100, shape
            text = results["http"].choices[0].text  # type: ignore[attr-defined]
            want_text = streamed_text(tokenizer, expected[long[0]])
            assert text == want_text, f"{shape}: {text!r} != {want_text!r}"

            # The pipeline is whole after the wave: one more request, alone.
            tokens, _ = grpc_client(coord, SHORT_PROMPTS[0])
            assert tokens == expected[SHORT_PROMPTS[0]], f"{shape}: {tokens}"
