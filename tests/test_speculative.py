"""Speculative decoding: a draft proposes, the pipeline verifies, the output is the target's.

In one process (a one-stage pipeline: the same engine and scheduler as a
cluster's head) and on real clusters: greedy output equals single-process
mlx-lm with a draft that always agrees, one that never does and one that
breaks mid-request; sampled output follows the target's distribution.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clusterkit import reference_tokens_of
from modelfactory import make_model

from pomona.worker.lockstep import Sampling, StageEngine, Step
from pomona.worker.scheduler import Delta, Done, GenRequest, Scheduler
from pomona.worker.shard import StageSpec, load_stage
from pomona.worker.speculative import (
    Costs,
    Drafter,
    DraftPolicy,
    DraftRefused,
    accept_greedy,
    accept_sampled,
    check_draft,
)

WORDS = ["four", "two", "many", "big", "small", "odd", "new", "old"]


def _prompt(i: int) -> str:
    return f"The lab has {WORDS[i % len(WORDS)]} machines and {i} cables"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speculative")
    return {
        "target": make_model(root / "target", "llama", num_layers=4, seed=11),
        "random": make_model(root / "random", "llama", num_layers=2, seed=99),
    }


def _run(
    target: Path,
    draft: Path | None,
    prompts: list[str],
    max_tokens: int,
    lanes: int = 2,
    **drafter: int,
) -> tuple[list[list[int]], list[Done], Drafter | None]:
    from mlx_lm.utils import load, load_tokenizer

    tokenizer = load_tokenizer(target)
    engine = StageEngine(load_stage(target, StageSpec(0, 4, 0, 1)))
    spec = Drafter(load(str(draft))[0], 4, **drafter) if draft is not None else None
    scheduler = Scheduler(
        lambda: tokenizer.detokenizer, tokenizer.eos_token_ids, lanes=lanes, drafter=spec
    )
    requests = [GenRequest(str(i), tokenizer.encode(p), max_tokens) for i, p in enumerate(prompts)]
    for r in requests:
        scheduler.submit(r)
    engine.head_session(scheduler.next_step, scheduler.on_tokens)
    tokens, done = [], []
    for req in requests:
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        tokens.append([t for e in events if isinstance(e, Delta) for t in e.tokens])
        assert isinstance(events[-1], Done)
        done.append(events[-1])
    assert scheduler.idle
    return tokens, done, spec


def test_greedy_output_with_a_draft_is_the_targets(models: dict[str, Path]) -> None:
    prompts = [_prompt(i) for i in range(3)]
    expected = reference_tokens_of(models["target"], prompts, 40)
    want = [expected[p] for p in prompts]

    # A draft that always agrees (the target itself): nearly every draft is kept.
    alone, done, same = _run(models["target"], models["target"], prompts[:1], 40)
    assert alone == want[:1]
    assert same is not None and same.verifies_total > 0
    assert same.accepted_total >= 0.9 * same.drafted_total
    assert done[0].drafted_tokens == same.drafted_total
    assert done[0].accepted_tokens == same.accepted_total
    # Concurrent requests: every row of a lane drafts its own.
    together, _, _ = _run(models["target"], models["target"], prompts, 40)
    assert together == want

    # A draft that never agrees: its tokens are refused, and it soon stops drafting.
    refused, done, rand = _run(models["target"], models["random"], prompts[:1], 40)
    assert refused == want[:1]
    assert rand is not None and rand.accepted_total <= 0.2 * rand.drafted_total
    assert done[0].drafted_tokens < 40  # it stopped drafting

    # A draft that breaks mid-request: the request goes on without it.
    broken, done, dead = _run(models["target"], models["target"], prompts[:1], 40, fail_after=2)
    assert broken == want[:1]
    assert dead is not None and dead.failed.startswith("RuntimeError")


def test_rejection_sampling_follows_the_targets_distribution() -> None:
    rng = np.random.default_rng(1234)
    vocab, k, draws = 5, 3, 20000
    p = rng.dirichlet(np.ones(vocab), size=k + 1)
    q = rng.dirichlet(np.ones(vocab), size=k)
    first = np.zeros(vocab)
    second = np.zeros((vocab, vocab))
    for _ in range(draws):
        drafts = [int(rng.choice(vocab, p=q[i])) for i in range(k)]
        out = accept_sampled(drafts, q, p, rng)
        assert 1 <= len(out) <= k + 1
        first[out[0]] += 1
        if len(out) > 1:
            second[out[0], out[1]] += 1
    # The first token follows p[0]: within 4 standard errors, at a fixed seed.
    expected = p[0] * draws
    assert np.all(np.abs(first - expected) < 4 * np.sqrt(expected) + 1), (first, expected)
    # After an accepted first draft, the second token follows p[1].
    for d in range(vocab):
        row = second[d]
        if row.sum() > 2000:
            freq = row / row.sum()
            assert np.all(np.abs(freq - p[1]) < 4 * np.sqrt(p[1] / row.sum()) + 0.01), d
    # A draft equal to the target is always kept.
    drafts = [int(rng.choice(vocab, p=p[i])) for i in range(k)]
    assert accept_sampled(drafts, p[:k], p, rng)[:k] == drafts


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_the_targets_next() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == [4]


def test_draft_length_adapts_and_drafting_stops_when_it_does_not_pay() -> None:
    costs = Costs()
    for _ in range(3):
        costs.plain_step(0.010)
    costs.verify_step(4, 0.016)  # the whole cycle: 4 ms of drafting, a 12 ms step
    good = DraftPolicy(k_max=4)
    for _ in range(5):
        good.record(4, 4)
    assert good.choose(costs) == 4
    poor = DraftPolicy(k_max=4)
    for _ in range(5):
        poor.record(4, 0)
    assert poor.choose(costs) == 0 and poor.stopped


def test_a_draft_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    target = make_model(tmp_path / "target", "llama", num_layers=2)
    other = make_model(tmp_path / "other", "llama", num_layers=2)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(DraftRefused, match="the draft model other has a different tokenizer"):
        check_draft(
            "target",
            "other",
            load_tokenizer(target),
            load_tokenizer(other),
            [("KVCache", None)],
            [],
        )
    with pytest.raises(DraftRefused, match="cannot drop rejected draft positions"):
        check_draft(
            "gemma",
            "target",
            load_tokenizer(target),
            load_tokenizer(target),
            [("KVCache", None), ("RotatingKVCache", 8)],
            [],
        )


def test_sampled_rows_verify_through_probabilities(models: dict[str, Path]) -> None:
    from mlx_lm.utils import load, load_tokenizer

    tokenizer = load_tokenizer(models["target"])
    engine = StageEngine(load_stage(models["target"], StageSpec(0, 4, 0, 1)))
    spec = Drafter(load(str(models["target"]))[0], 4)
    scheduler = Scheduler(lambda: tokenizer.detokenizer, tokenizer.eos_token_ids, drafter=spec)
    req = GenRequest(
        "s", tokenizer.encode(_prompt(1)), 30, Sampling(temperature=0.8, top_p=0.9, seed=7)
    )
    scheduler.submit(req)
    engine.head_session(scheduler.next_step, scheduler.on_tokens)
    events = []
    while not req.events.empty():
        events.append(req.events.get())
    assert isinstance(events[-1], Done) and events[-1].completion_tokens > 0
    assert spec.verifies_total > 0 and spec.accepted_total > 0


def test_a_verify_step_and_its_trim_travel_in_the_control_vector() -> None:
    from pomona.worker.lockstep import Step, decode_ctrl, encode_ctrl

    step = Step(1, prefill=False, tokens=(4, 5, 6, 7), width=4, trim=2, probs=True, remove=(0,))
    back = decode_ctrl(encode_ctrl(step))
    assert back is not None and (back.width, back.trim, back.probs) == (4, 2, True)
    assert len(back.tokens) == 4 and back.remove == (0,)
    with pytest.raises(ValueError, match="neither prefills nor admits"):
        encode_ctrl(Step(0, prefill=False, tokens=(1, 2), width=2, join=(Sampling(),)))


def test_the_planner_counts_the_draft_on_the_head_node() -> None:
    from pomona.coordinator.planner import NodeSpec, PlanError, plan
    from pomona.model_profile import ModelProfile

    gib = 2**30
    config = json.loads(
        (Path(__file__).parents[1] / "pomona/model_configs/llama-3.1-8b.json").read_text()
    )
    profile = ModelProfile.from_config(config, name="llama-3.1-8b")
    nodes = [
        NodeSpec("a", "a", "Apple M4 Pro", 24 * gib),
        NodeSpec("b", "b", "Apple M4 Pro", 24 * gib),
    ]
    alone = plan(profile, nodes, context_length=4096, objective="latency")
    assert len(alone.stages) == 1  # the 16 GB model fits one node
    drafted = plan(profile, nodes, context_length=4096, objective="latency", draft_bytes=8 * gib)
    assert len(drafted.stages) == 2  # with an 8 GB draft beside it, it does not
    with pytest.raises(PlanError):
        plan(profile, nodes[:1], context_length=4096, draft_bytes=8 * gib)

    # An operator's --layers split counts it too, on the head's node.
    from pomona.coordinator.placement import PlacementError, manual_split

    manual_split(profile, nodes, [30, 2], "llama-3.1-8b")
    with pytest.raises(PlacementError, match=r"a would hold .* and the draft model \(12\.0 GiB\)"):
        manual_split(profile, nodes, [30, 2], "llama-3.1-8b", draft_bytes=12 * gib)


def test_unmeasured_draft_lengths_are_priced_between_the_measured_ones() -> None:
    costs = Costs()
    costs.plain_step(0.010)
    costs.verify_step(4, 0.018)
    assert costs.verify_cost(2) == pytest.approx(0.014)  # between plain and k = 4
    assert costs.verify_cost(6) == pytest.approx(0.022)  # the same slope beyond


def test_a_next_turn_restores_kv_written_by_verify_steps(models: dict[str, Path]) -> None:
    """The prefix cache keeps a finished request's KV after its rejected drafts were
    trimmed: a next turn restored from it gets the tokens of mlx-lm alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load, load_tokenizer

    from pomona.worker.prefix_cache import PrefixCache

    # Its last two layers write weakly into the residual stream: its first two
    # alone make a draft that agrees often, not always, at half the cost.
    target = make_model(models["target"].parent / "weak-tail", "llama", num_layers=4, seed=11)
    for path in target.glob("*.safetensors"):
        weights = mx.load(str(path))
        for name in weights:
            if name.endswith(("o_proj.weight", "down_proj.weight")) and ".layers.2." in name:
                weights[name] = weights[name] * 0.2
            if name.endswith(("o_proj.weight", "down_proj.weight")) and ".layers.3." in name:
                weights[name] = weights[name] * 0.2
        mx.save_safetensors(str(path), weights)
    model, tokenizer = load(str(target))

    def reference(ids: list[int], n: int) -> list[int]:
        out = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=n):
            if int(token) in tokenizer.eos_token_ids:
                break
            out.append(int(token))
        return out

    engine = StageEngine(load_stage(target, StageSpec(0, 4, 0, 1)))
    draft = load(str(target))[0]
    draft.model.layers = draft.model.layers[:2]
    spec = Drafter(draft, 4)
    scheduler = Scheduler(
        lambda: load_tokenizer(target).detokenizer,
        tokenizer.eos_token_ids,
        drafter=spec,
        prefix_cache=PrefixCache(10**9, 1, min_tokens=32),
    )
    first = tokenizer.encode(" ".join(_prompt(i) for i in range(4)))
    turns = []
    for prompt in (first, None):
        if prompt is None:
            prompt = first + turns[0] + tokenizer.encode(" and then")
        req = GenRequest(str(len(turns)), prompt, 24)
        scheduler.submit(req)
        engine.head_session(scheduler.next_step, scheduler.on_tokens)
        events = []
        while not req.events.empty():
            events.append(req.events.get())
        turns.append([t for e in events if isinstance(e, Delta) for t in e.tokens])
        assert turns[-1] == reference(prompt, 24)
        assert isinstance(events[-1], Done)
    assert events[-1].cached_tokens > len(first)  # the restore reached the generated tokens
    assert 0 < spec.accepted_total < spec.drafted_total, (spec.accepted_total, spec.drafted_total)


def test_one_slow_step_does_not_swing_the_measured_costs() -> None:
    costs = Costs()
    for seconds in (0.010, 0.011, 0.350, 0.010):  # a kernel compiled on its first use
        costs.plain_step(seconds)
        costs.verify_step(2, seconds + 0.002)
    assert costs.plain == pytest.approx(0.0105)
    assert costs.verify[2] == pytest.approx(0.0125)


def test_measuring_steps_chain_as_the_steps_of_a_request_that_does_not_draft(
    models: dict[str, Path],
) -> None:
    """The plain steps a draft is weighed against are chained ones, timed from
    one step's tokens to the next: what a plain token costs when no draft runs."""
    from mlx_lm.utils import load, load_tokenizer

    target = models["target"]
    tokenizer = load_tokenizer(target)
    engine = StageEngine(load_stage(target, StageSpec(0, 4, 0, 1)))
    drafter = Drafter(load(str(target))[0], 2)
    scheduler = Scheduler(
        lambda: tokenizer.detokenizer,
        tokenizer.eos_token_ids,
        lanes=1,
        chain=True,
        drafter=drafter,
    )
    steps: list[Step] = []

    def next_step() -> Step | None:
        step = scheduler.next_step()
        if step is not None:
            steps.append(step)
        return step

    scheduler.submit(GenRequest("a", tokenizer.encode(_prompt(0)), 12))
    engine.head_session(next_step, scheduler.on_tokens)
    decode = [s for s in steps if not s.prefill]
    # The join, then plain steps until PLAIN_PROBES are measured: chained ones.
    assert not decode[1].chained and decode[2].chained and decode[2].width == 1
    assert drafter.costs.plain_samples >= 3
    assert any(s.width > 1 for s in decode)  # then it drafts


@pytest.mark.parametrize("draft", ["target", "random"])
def test_rows_of_one_lane_draft_and_drop_their_own_rejected_positions(
    models: dict[str, Path], draft: str
) -> None:
    """Four requests in one lane: each row drafts its own k and keeps its own
    accepted drafts; the rows that kept fewer roll the rest into left padding.
    Greedy tokens stay single-process mlx-lm's, prompts of different lengths."""
    prompts = [_prompt(i) + " and more" * i for i in range(4)]
    expected = reference_tokens_of(models["target"], prompts, 30)
    tokens, done, drafter = _run(models["target"], models[draft], prompts, 30, lanes=1)
    assert tokens == [expected[p] for p in prompts]
    assert drafter is not None and drafter.verifies_total > 0
    assert all(d.drafted_tokens > 0 for d in done)  # every row drafted
    if draft == "random":
        assert drafter.accepted_total < drafter.drafted_total  # rows kept different counts


def test_rows_that_keep_different_numbers_of_drafts_keep_the_targets_tokens(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row drafts 4 every step (the policy pinned), and the drafts of rows
    2 and 3 are spoiled after the first and from the first: in one step rows
    keep up to 4, 1 and 0 drafts, so the caches drop different numbers of
    positions per row."""
    import pomona.worker.speculative as spec

    monkeypatch.setattr(spec.DraftPolicy, "choose", lambda self, costs: self.k_max)
    propose = spec.Drafter.propose
    spoiled = {2: 1, 3: 0}  # row index (by prompt) -> drafts left unspoiled

    def spoil(self, rid, seq, k, sampling):  # type: ignore[no-untyped-def]
        proposal = propose(self, rid, seq, k, sampling)
        row = next((i for i, p in enumerate(prompts) if list(seq[: len(p)]) == p), None)
        if proposal is not None and row in spoiled:
            keep = spoiled[row]
            proposal.drafts[keep:] = [(d + 1) % 64 for d in proposal.drafts[keep:]]
        return proposal

    monkeypatch.setattr(spec.Drafter, "propose", spoil)
    from mlx_lm.utils import load_tokenizer

    texts = [_prompt(i) + " and more" * i for i in range(4)]
    tokenizer = load_tokenizer(models["target"])
    prompts = [tokenizer.encode(t) for t in texts]
    expected = reference_tokens_of(models["target"], texts, 24)
    seen: list[Step] = []
    run_step = StageEngine.run_step

    def record(self, step, fed=None):  # type: ignore[no-untyped-def]
        seen.append(step)
        return run_step(self, step, fed)

    monkeypatch.setattr(StageEngine, "run_step", record)
    tokens, _, drafter = _run(models["target"], models["target"], texts, 24, lanes=1)
    assert tokens == [expected[t] for t in texts]
    assert drafter is not None and drafter.verifies_total > 0
    assert any(s.row_trims for s in seen)  # rows dropped different counts
    assert any(s.width == 5 and len(s.tokens) == 20 for s in seen)  # 4 rows, 4 drafts each


def test_per_row_trims_travel_in_the_control_vector() -> None:
    from pomona.worker.lockstep import decode_ctrl, encode_ctrl

    step = Step(0, prefill=False, tokens=(5,) * 9, width=3, trim=1, row_trims=(0, 2, 1))
    back = decode_ctrl(encode_ctrl(step))
    assert back is not None and back.row_trims == (0, 2, 1) and back.trim == 1


def test_a_new_request_starts_from_what_the_draft_showed_before() -> None:
    """A draft that rarely agreed pauses a new request after one verify step."""
    drafter = Drafter(None, 4)
    assert drafter._new_policy().evidence == 3  # nothing shown yet: the prior
    for _ in range(3):
        drafter.row_verified(0, 4, 0)
        drafter.step_verified(1, 4, 0.02, 1)
    policy = drafter._new_policy()
    assert policy.acceptance == 0.0 and policy.evidence == 1
    costs = Costs()
    for _ in range(3):
        costs.plain_step(0.010)
    costs.verify_step(1, 0.014)
    assert policy.choose(costs) == 1  # its one verify step of evidence
    policy.record(1, 0)
    assert policy.choose(costs) == 0 and policy.stopped  # then it pauses
