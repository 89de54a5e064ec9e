"""Batched admission and lanes in one process: the tokens of mlx-lm alone.

Requests that arrive together are prefilled in one right-padded batch and
spread over two lanes with their own caches; prompts longer than a chunk are
prefilled alone. Each request must still get, token for token, what greedy
single-process mlx-lm gives it. A model whose attention cannot take a batch
(gemma2 in mlx-lm) is served one request per lane, and still gets them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clusterkit import reference_tokens
from modelfactory import make_model

from pomona.worker.lockstep import StageEngine
from pomona.worker.scheduler import Delta, Done, Finish, GenRequest, Scheduler
from pomona.worker.shard import StageSpec, load_stage

WORDS = ["four", "two", "many", "big", "small", "odd", "new", "old"]


def _prompt(i: int) -> str:
    text = f"The lab has {WORDS[i % len(WORDS)]} machines and {i} cables"
    return text * 4 if i % 4 == 0 else text  # some longer than a prefill chunk


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "qwen3_moe", "gemma2"])
def test_batched_admission_over_two_lanes_matches_single_process(arch: str, tmp_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    model = make_model(tmp_path / arch, arch, num_layers=4, seed=11)
    tokenizer = load_tokenizer(model)
    engine = StageEngine(load_stage(model, StageSpec(0, 4, 0, 1)))
    scheduler = Scheduler(
        lambda: tokenizer.detokenizer,
        tokenizer.eos_token_ids,
        prefill_step=16,
        max_batch=8,
        lanes=2,
        rows_per_lane=8 if engine.can_batch() else 1,
    )
    prompts = [_prompt(i) for i in range(10)]
    requests = [
        GenRequest(str(i), tokenizer.encode(p), max_tokens=12) for i, p in enumerate(prompts)
    ]
    for r in requests:
        scheduler.submit(r)
    engine.head_session(scheduler.next_step, scheduler.on_tokens)

    for prompt, req in zip(prompts, requests, strict=True):
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        tokens = [t for e in events if isinstance(e, Delta) for t in e.tokens]
        assert tokens == reference_tokens(model, prompt, 12), prompt
        assert isinstance(events[-1], Done) and events[-1].reason in (Finish.LENGTH, Finish.STOP)
    assert scheduler.idle


def test_a_model_that_cannot_batch_is_found_before_serving(tmp_path: Path) -> None:
    def engine(arch: str) -> StageEngine:
        model = make_model(tmp_path / arch, arch, num_layers=2, seed=3)
        return StageEngine(load_stage(model, StageSpec(0, 2, 0, 1)))

    assert engine("llama").can_batch()
    assert not engine("gemma2").can_batch()
