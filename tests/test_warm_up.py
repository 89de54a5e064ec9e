"""The warm-up session at load: every rank runs the step shapes a request meets
first (two prefill chunks, the joining and a plain decode step, each verify
width), so that an accelerator compiles their kernels before the first user.

On by default on a GPU only; ``POMONA_WARMUP=1`` turns it on here. What it
must never do: change a token, leave a rank out of step with the head, or
leave anything behind in the caches of the first real request.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from clusterkit import (
    generate_together,
    generate_tokens,
    local_cluster,
    reference_tokens_of,
    wait_serving,
)
from modelfactory import make_model

from pomona.worker.lockstep import Sampling, warm_up_steps

pytestmark = pytest.mark.cluster

WARM = {"POMONA_WARMUP": "1"}
PROMPTS = [
    f"Warm machine {i} holds {w} layers; " * (1 + 3 * i)
    for i, w in enumerate(["four", "two", "nine"])
]


def test_warm_up_steps_cover_both_prefill_chunks_the_join_and_every_verify_width() -> None:
    steps = warm_up_steps(8, widths=(2, 3, 4))
    assert [s.prefill for s in steps] == [True, True, False, False, False, False, False]
    assert steps[0].new_group and not steps[1].new_group
    assert steps[0].chunk == ((0,) * 8,) == steps[1].chunk
    assert steps[2].join == (Sampling(),) and steps[2].tokens == (0,)
    assert [s.width for s in steps[3:]] == [1, 2, 3, 4]
    assert all(len(s.tokens) == s.width for s in steps[3:])


def _warmed(root: Path) -> None:
    """The head runner logged its warm-up (runners log under their worker's runs/)."""
    logs = list(root.glob("state-*/runs/runner-*.log"))
    assert sum("warmed up in" in p.read_text() for p in logs) == 1, [p.name for p in logs]


@pytest.mark.parametrize(
    ("arch", "workers", "extra"),
    [
        ("qwen3", 3, ()),  # every rank follows the warm-up session
        ("llama", 2, ("--parallel", "tensor")),
    ],
)
def test_a_warmed_cluster_gives_single_process_tokens(
    tmp_path: Path, arch: str, workers: int, extra: tuple[str, ...]
) -> None:
    model = make_model(tmp_path / arch, arch, num_layers=5, seed=7)
    expected = reference_tokens_of(model, PROMPTS, 12)
    with local_cluster(tmp_path) as c:
        for i in random.sample(range(workers), workers):
            c.worker(f"w{i}", env=WARM)
        # Chunks of 16 tokens: the longer prompts take several, as long prompts would.
        coord = c.coordinator(
            str(model), min_workers=workers, extra=("--prefill-step", "16", *extra)
        )
        wait_serving(coord)
        _warmed(tmp_path)
        for prompt in PROMPTS:
            tokens, _, _ = generate_tokens(coord, prompt, max_tokens=12)
            assert tokens == expected[prompt], prompt


def test_a_warmed_draft_and_its_verify_widths_give_the_targets_tokens(tmp_path: Path) -> None:
    target = make_model(tmp_path / "llama", "llama", num_layers=4, seed=5)
    expected = reference_tokens_of(target, PROMPTS, 16)
    with local_cluster(tmp_path) as c:
        c.worker("w0", env=WARM)
        c.worker("w1", env=WARM)
        coord = c.coordinator(
            str(target),
            min_workers=2,
            extra=("--draft-model", str(target), "--num-draft-tokens", "3"),
        )
        wait_serving(coord)
        _warmed(tmp_path)
        assert generate_together(coord, PROMPTS, 16) == expected
        tokens, _, last = generate_tokens(coord, PROMPTS[0], max_tokens=16)
        assert tokens == expected[PROMPTS[0]]
        assert last.usage.drafted_tokens > 0
