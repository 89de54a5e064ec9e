"""Speculative decoding on real clusters: drafts verified through every stage.

Two workers serve a llama target with a draft that always agrees; three
workers a qwen3 target with a random draft that breaks after a few proposals.
Greedy output is single-process mlx-lm's either way.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest
from clusterkit import (
    coordinator_stub,
    generate_together,
    generate_tokens,
    local_cluster,
    reference_tokens_of,
    wait_for,
    wait_serving,
)
from modelfactory import make_model

from pomona.local import free_port_pair
from pomona.v1 import coordinator_pb2

pytestmark = pytest.mark.cluster

PROMPTS = [f"The lab has {w} machines and {i} cables" for i, w in enumerate(["four", "two", "big"])]


def test_two_workers_with_an_agreeing_draft_give_the_targets_tokens(tmp_path: Path) -> None:
    target = make_model(tmp_path / "llama", "llama", num_layers=4, seed=5)
    expected = reference_tokens_of(target, PROMPTS, 24)
    http_port = free_port_pair(set())
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(
            str(target),
            min_workers=2,
            http_port=http_port,
            extra=("--draft-model", str(target), "--num-draft-tokens", "3"),
        )
        wait_serving(coord)
        tokens, _, last = generate_tokens(coord, PROMPTS[0], max_tokens=24)
        assert tokens == expected[PROMPTS[0]]
        assert last.usage.drafted_tokens > 0
        assert last.usage.accepted_tokens >= 0.9 * last.usage.drafted_tokens

        assert generate_together(coord, PROMPTS, 24) == expected

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        reply = client.completions.create(
            model="llama", prompt=PROMPTS[1], max_tokens=16, temperature=0
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 16
        extra = (reply.usage.model_extra or {})["pomona_speculative"]
        assert extra["drafted_tokens"] > 0 and extra["accepted_tokens"] > 0
        sampled = client.completions.create(
            model="llama", prompt=PROMPTS[2], max_tokens=16, temperature=0.8, seed=3
        )
        assert sampled.usage is not None and sampled.usage.completion_tokens > 0

        def measured() -> coordinator_pb2.StatusReply | None:
            reply = coordinator_stub(coord).Status(coordinator_pb2.StatusRequest(), timeout=10)
            return reply if reply.HasField("tokens_per_verify_step") else None

        status = wait_for(measured, 30, "the draft's figures in the status")
        assert status.draft_model == str(target)
        assert status.draft_acceptance_rate > 0.9
        assert status.tokens_per_verify_step > 2
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "pomona_cluster_draft_acceptance_ratio" in metrics
        assert "pomona_runner_draft_accepted_tokens_total" in metrics


def test_three_workers_with_a_random_draft_that_breaks_give_the_targets_tokens(
    tmp_path: Path,
) -> None:
    target = make_model(tmp_path / "qwen3", "qwen3", num_layers=6, seed=7)
    draft = make_model(tmp_path / "draft", "qwen3", num_layers=1, seed=8)
    expected = reference_tokens_of(target, PROMPTS, 24)
    with local_cluster(tmp_path) as c:
        for name in ("w0", "w1", "w2"):
            # The head's draft raises at its 7th proposal: after a few verify steps.
            c.worker(name, env={"POMONA_TEST_DRAFT_FAIL_AFTER": "6"})
        coord = c.coordinator(str(target), min_workers=3, extra=("--draft-model", str(draft)))
        wait_serving(coord)
        for prompt in PROMPTS:
            assert generate_tokens(coord, prompt, max_tokens=24)[0] == expected[prompt]

        def failed() -> bool:
            events = coordinator_stub(coord).Events(coordinator_pb2.EventsRequest(), timeout=10)
            return any(e.kind == "draft_failed" for e in events)

        wait_for(failed, 30, "the draft's failure in the events")
        # Drafting is off now; the next request decodes plainly.
        tokens, _, last = generate_tokens(coord, PROMPTS[0], max_tokens=24)
        assert tokens == expected[PROMPTS[0]] and last.usage.drafted_tokens == 0


def test_a_draft_with_another_tokenizer_is_refused_with_both_named(tmp_path: Path) -> None:
    target = make_model(tmp_path / "llama", "llama", num_layers=2, seed=5)
    other = make_model(tmp_path / "other", "llama", num_layers=1, seed=6)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        coord = c.coordinator(str(target), extra=("--draft-model", str(other)))

        def refused() -> str:
            events = coordinator_stub(coord).Events(coordinator_pb2.EventsRequest(), timeout=10)
            return next((e.message for e in events if e.kind == "load_failed"), "")

        message = wait_for(refused, 60, "the load to fail")
        assert f"the draft model {other} has a different tokenizer from {target}" in message
