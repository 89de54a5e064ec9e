"""The prefix KV cache: the head's decisions, and real pipelines that reuse KV.

A prompt that starts like a finished request's tokens restores their KV on
every stage and prefills only the rest; the tokens must stay, token for
token, those of single-process mlx-lm, whether a prompt hits, misses, or
finds its entry evicted by a small budget, with requests running together.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from clusterkit import (
    coordinator_stub,
    generate_tokens,
    local_cluster,
    reference_tokens_of,
    wait_for,
    wait_serving,
)
from modelfactory import make_model

from pomona.coordinator.prompt_cache_plan import (
    PromptCacheError,
    prompt_cache_budget,
    token_bytes,
)
from pomona.model_profile import ModelProfile
from pomona.v1 import coordinator_pb2
from pomona.worker.lockstep import Step, decode_ctrl, encode_ctrl
from pomona.worker.prefix_cache import PrefixCache

# -- the head's index (no MLX, no processes) ------------------------------------


def test_the_longest_shared_prefix_hits_and_leaves_two_tokens_to_compute() -> None:
    cache = PrefixCache(10_000, 10)
    first, _ = cache.store([1, 2, 3, 4, 5, 6], max_evict=8) or (0, [])
    other, _ = cache.store([1, 2, 9, 9], max_evict=8) or (0, [])
    hit = cache.lookup([1, 2, 3, 4, 7, 8, 9])
    assert hit is not None and (hit.entry, hit.tokens) == (first, 4)
    # The whole entry is the prompt: its last two tokens are still computed.
    assert cache.lookup([1, 2, 3, 4, 5, 6]) == type(hit)(first, 4)
    assert cache.lookup([7, 1, 2]) is None
    assert cache.lookup([1, 2, 9, 9, 9]) == type(hit)(other, 3)
    assert (cache.lookups, cache.hits, cache.hit_tokens) == (4, 3, 11)


def test_least_recently_used_entries_are_evicted_within_the_budget() -> None:
    cache = PrefixCache(budget_bytes=20 * 8, token_bytes=8)  # 20 tokens
    a, _ = cache.store(list(range(0, 8)), max_evict=8) or (0, [])
    b, _ = cache.store(list(range(100, 108)), max_evict=8) or (0, [])
    assert cache.lookup(list(range(0, 6))) is not None  # a is now the most recent
    assert cache.unpin(a) is None
    c, evicted = cache.store(list(range(200, 208)), max_evict=8) or (0, [])
    assert evicted == [b] and cache.entries == 2 and cache.bytes <= cache.budget_bytes
    # A pinned entry (a hit whose restore is not sent yet) is never evicted.
    assert cache.lookup(list(range(200, 206))) is not None
    d, evicted = cache.store(list(range(300, 308)), max_evict=8) or (0, [])
    assert evicted == [a] and c != d
    f, evicted = cache.store(list(range(400, 408)), max_evict=8) or (0, [])
    assert evicted == [d]  # c is pinned
    cache.unpin(c)
    assert cache.store(list(range(400, 430)), max_evict=8) is None  # larger than the budget
    # An entry that extends another replaces it; one already held is not stored twice.
    _, evicted = cache.store(list(range(400, 410)), max_evict=8) or (0, [])
    assert f in evicted
    assert cache.store(list(range(400, 405)), max_evict=8) is None


def test_sliding_window_entries_are_kept_only_while_shorter_than_the_window() -> None:
    cache = PrefixCache(10_000, 1, max_tokens=16)
    assert cache.store(list(range(15)), max_evict=8) is not None
    assert cache.store(list(range(100, 116)), max_evict=8) is None


def test_the_control_vector_carries_stores_evictions_and_a_restore() -> None:
    step = Step(1, prefill=True, chunk=((5, 6, 7),), new_group=True, remove=(0, 2),
                store=((0, 7), (2, 9)), evict=(3, 4), restore=(7, 40))  # fmt: skip
    back = decode_ctrl(encode_ctrl(step))
    assert back is not None
    assert (back.store, back.evict, back.restore, back.remove) == (
        step.store,
        step.evict,
        step.restore,
        step.remove,
    )
    with pytest.raises(ValueError, match="restores a prefix"):
        encode_ctrl(Step(0, prefill=False, tokens=(1,), restore=(7, 40)))


def test_the_planner_sizes_the_budget_and_refuses_one_that_does_not_fit(tmp_path: Path) -> None:
    profile = ModelProfile.from_model_dir(make_model(tmp_path / "m", "llama", num_layers=4))
    per_layer = profile.kv_bytes_per_token_per_layer[0]
    assert token_bytes(profile, [(0, 1), (1, 4)]) == 3 * per_layer
    default = prompt_cache_budget(profile, [(0, 2), (2, 4)], [("a", 10**9), ("b", 4 * 10**8)], None)
    assert default.bytes == 2 * 10**8 and default.token_bytes == 2 * per_layer
    assert prompt_cache_budget(profile, [(0, 4)], [("a", 10**9)], 0).bytes == 0
    with pytest.raises(PromptCacheError, match="--prompt-cache-gb 2 does not fit: b has"):
        prompt_cache_budget(profile, [(0, 2), (2, 4)], [("a", 10**10), ("b", 10**9)], 2.0)


# -- real pipelines --------------------------------------------------------------

SYSTEM = "You are a careful assistant of the lab. Answer in short sentences. "
QUESTIONS = ["How many machines?", "Which cables?", "What is odd?", "Who is new?"]


def _generate_all(coord, prompts: list[str]) -> list[tuple[list[int], str, int]]:
    def one(prompt: str) -> tuple[list[int], str, int]:
        tokens, text, last = generate_tokens(coord, prompt, max_tokens=10)
        return tokens, text, last.usage.cached_tokens

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("arch", "layers", "overrides"),
    [
        ("llama", "2,2", {}),
        ("qwen3", "2,1,1", {}),
        # Turn-one entries fit the window and are kept; longer ones are not,
        # and a restored prefix is extended past the window.
        ("gemma3", "3,3", {"sliding_window": 72}),
    ],
)
def test_hits_misses_and_evictions_under_concurrency_keep_single_process_tokens(
    tmp_path: Path, arch: str, layers: str, overrides: dict[str, int]
) -> None:
    sizes = [int(x) for x in layers.split(",")]
    model = make_model(tmp_path / arch, arch, num_layers=sum(sizes), seed=5, overrides=overrides)
    profile = ModelProfile.from_model_dir(model)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    per_token = token_bytes(profile, list(zip([0, *ends], ends, strict=False)))
    budget = 140 * per_token  # two turn-one entries (~63 tokens): the others are evicted
    firsts = [SYSTEM + q for q in QUESTIONS]
    with local_cluster(tmp_path) as c:
        for i in range(len(sizes)):
            c.worker(f"w{i}")
        extra = ("--prefill-step", "16", "--prompt-cache-gb", f"{budget / 1e9:.12f}")
        coord = c.coordinator(str(model), min_workers=len(sizes), layers=layers, extra=extra)
        wait_serving(coord)

        turn_one = _generate_all(coord, firsts)
        seconds = [
            p + text + " And then?" for p, (_, text, _) in zip(firsts, turn_one, strict=True)
        ]
        turn_two = _generate_all(coord, seconds)
        again = _generate_all(coord, firsts)  # some hit, some were evicted

        expected = reference_tokens_of(model, firsts + seconds, 10)
        for prompt, (tokens, _, _) in zip(
            firsts + seconds + firsts, turn_one + turn_two + again, strict=True
        ):
            assert tokens == expected[prompt], prompt
        # Every turn-two prompt shares at least the system prompt with a kept entry.
        from mlx_lm.utils import load_tokenizer

        shared = len(load_tokenizer(model).encode(SYSTEM)) - 2
        assert all(cached >= shared for _, _, cached in turn_two), [x[2] for x in turn_two]

        def status() -> coordinator_pb2.StatusReply | None:
            reply = coordinator_stub(coord).Status(coordinator_pb2.StatusRequest(), timeout=5)
            return (
                reply
                if reply.prompt_cache_bytes and reply.HasField("prompt_cache_hit_rate")
                else None
            )

        reply = wait_for(status, 20, "the prefix cache's figures in the status")
        assert reply.prompt_cache_budget_bytes == int(budget)
        assert 0 < reply.prompt_cache_bytes <= reply.prompt_cache_budget_bytes
        assert 0 < reply.prompt_cache_hit_rate <= 1
