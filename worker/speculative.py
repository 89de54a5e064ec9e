"""Speculative decoding on the head runner: a draft model proposes, the pipeline verifies.

The head holds every token of a request, so the draft runs there and needs
nothing sent to it. For a lane with one row the head drafts ``k`` tokens,
then one *verify step* feeds ``[last token, d1..dk]`` through every stage at
once; the last rank returns the target's ``k + 1`` greedy tokens (or, for a
sampled row, its ``k + 1`` probability rows after the request's sampler
transforms). The head decides what is accepted (``accept_greedy``: exactly
the non-speculative tokens; ``accept_sampled``: the standard rejection
sampling, whose output follows the target's distribution) and every stage
drops the rejected positions from its caches at the lane's next step.

``DraftPolicy`` chooses ``k`` per request from its measured acceptance and
the measured costs of drafting, of a verify step and of a plain decode step,
and stops drafting for a request when it does not pay. A draft that raises
turns drafting off for good; the request goes on with plain decode steps.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

if TYPE_CHECKING:
    from pomona.worker.lockstep import Sampling

log = logging.getLogger(__name__)

# A request pauses drafting once this many verify steps show it does not pay.
EVIDENCE = 3
# Acceptance starts here for a new request (the draft has to prove itself
# quickly: a poor one stops after ``EVIDENCE`` verify steps).
PRIOR_ACCEPTANCE = 0.7
EMA = 0.3  # weight of the newest acceptance measurement
RECENT = 9  # measured step costs whose median is the estimate
# Plain decode steps measured before any drafting, and one plain step in every
# ``REPROBE`` of a request's steps, so the comparison follows the machine's load.
PLAIN_PROBES = 3
REPROBE = 64
FIRST_PAUSE = 16
MAX_PAUSE = 512


class DraftRefused(ValueError):
    """The draft cannot serve this target (the message says why)."""


def transform_logprobs(logprobs: mx.array, sampling: Sampling) -> mx.array:
    """The request's sampler filters, in mlx-lm's ``make_sampler`` order (B, V)."""
    s = sampling
    if 0 < s.top_p < 1.0:
        logprobs = apply_top_p(logprobs, s.top_p)
    if s.min_p != 0.0:
        logprobs = apply_min_p(logprobs, s.min_p, 1)
    if s.top_k > 0:
        logprobs = apply_top_k(logprobs, s.top_k)
    return logprobs


def sampling_probs(logits: mx.array, sampling: Sampling) -> mx.array:
    """The distribution a sampled row draws from at each position (N, V), float32."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    filtered = transform_logprobs(logprobs, sampling)
    return mx.softmax(filtered.astype(mx.float32) / sampling.temperature, axis=-1)


def accept_greedy(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """The tokens a greedy verify step yields: the drafts the target agrees with, then its own."""
    out: list[int] = []
    for d, t in zip(drafts, targets, strict=False):
        out.append(t)
        if d != t:
            return out
    out.append(targets[len(drafts)])
    return out


def accept_sampled(
    drafts: Sequence[int], q: np.ndarray, p: np.ndarray, rng: np.random.Generator
) -> list[int]:
    """Speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

    ``q`` (k, V): the draft's distributions each draft was drawn from; ``p``
    (k + 1, V): the target's at the same positions and one more. Draft i is
    kept with probability min(1, p/q); the first one refused is replaced by a
    draw from norm(max(0, p - q)); when all are kept a bonus token is drawn
    from the last row of ``p``. The tokens returned follow ``p`` exactly.
    """
    out: list[int] = []
    for i, d in enumerate(drafts):
        pi, qi = float(p[i, d]), float(q[i, d])
        if qi > 0 and rng.random() * qi < pi:
            out.append(int(d))
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        row = residual / total if total > 0 else p[i] / p[i].sum()
        out.append(int(rng.choice(row.shape[0], p=row)))
        return out
    last = p[len(drafts)]
    out.append(int(rng.choice(last.shape[0], p=last / last.sum())))
    return out


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verify step of ``k`` drafts yields at this per-draft acceptance."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


@dataclass
class Costs:
    """Measured seconds: a plain decode step, and a verify cycle by k (drafting included).

    Each figure is the median of its last ``RECENT`` measurements, so that one
    slow step (a kernel compiled on its first use, a hiccup of the machine)
    does not swing the choice for the steps after it.
    """

    plain_samples: int = 0
    _plain: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    _verify: dict[int, deque[float]] = field(default_factory=dict)

    @property
    def plain(self) -> float | None:
        return statistics.median(self._plain) if self._plain else None

    @property
    def verify(self) -> dict[int, float]:
        return {k: statistics.median(v) for k, v in self._verify.items()}

    def plain_step(self, seconds: float) -> None:
        self._plain.append(seconds)
        self.plain_samples += 1

    def verify_step(self, k: int, seconds: float) -> None:
        self._verify.setdefault(k, deque(maxlen=RECENT)).append(seconds)

    def verify_cost(self, k: int) -> float | None:
        """A verify step of ``k`` drafts: measured, else interpolated between the
        measured ones and a plain step (k = 0), or extrapolated from the last two."""
        verify, plain = self.verify, self.plain
        if k in verify:
            return verify[k]
        if not verify or plain is None:
            return None
        points = sorted({0: min(plain, *verify.values()), **verify}.items())
        below = [p for p in points if p[0] < k]
        above = [p for p in points if p[0] > k]
        if above:
            (k0, t0), (k1, t1) = below[-1], above[0]
        else:
            (k0, t0), (k1, t1) = points[-2], points[-1]
        slope = max(0.0, (t1 - t0) / (k1 - k0))
        return t0 + slope * (k - k0)


@dataclass
class DraftPolicy:
    """How many tokens to draft for one request, from what it has shown so far."""

    k_max: int
    acceptance: float = PRIOR_ACCEPTANCE
    verifies: int = 0
    steps: int = 0
    paused_until: int = 0  # plain steps until this step
    pause: int = FIRST_PAUSE
    evidence: int = EVIDENCE  # verify steps before drafting may pause

    @property
    def stopped(self) -> bool:
        return self.steps < self.paused_until

    def record(self, k: int, accepted: int) -> None:
        self.verifies += 1
        self.acceptance = (1 - EMA) * self.acceptance + EMA * (accepted / max(k, 1))

    def choose(self, costs: Costs) -> int:
        """Drafts for the next step; 0 while drafting does not pay for this request.

        When it does not, the request decodes plainly for a pause that doubles
        each time (16 steps, then 32, ... up to 512), then one verify step
        probes whether the draft has become worth it: a draft that never pays
        costs a few per cent early in a stream and less and less after.
        """
        self.steps += 1
        if self.stopped or costs.plain_samples < PLAIN_PROBES or self.steps % REPROBE == 0:
            return 0  # a plain step: measure what drafting is compared with
        plain, measured = costs.plain, costs.verify
        assert plain is not None
        if not measured:
            return self.k_max  # nothing measured yet: try the most
        # A verify step never costs less than a plain one: the cheaper of the two
        # measured is the better estimate of a plain step (the first plain steps
        # of a runner are often slow ones).
        plain_rate = 1.0 / min(plain, *measured.values())
        best_k, best_rate = 0, plain_rate
        for k in range(1, self.k_max + 1):
            verify = costs.verify_cost(k)
            assert verify is not None
            # A verify step's cost is its whole cycle: every row's drafting, the
            # step, and the head's work around it (none of it overlaps, where a
            # plain step chains).
            rate = expected_tokens(self.acceptance, k) / verify
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k:
            return best_k
        if self.verifies < self.evidence:
            return 1
        self.paused_until = self.steps + self.pause
        self.pause = min(2 * self.pause, MAX_PAUSE)
        self.evidence = self.verifies + 1
        return 0


@dataclass
class _DraftState:
    cache: list[Any]
    fed: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds
    policy: DraftPolicy = field(default_factory=lambda: DraftPolicy(0))
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    key: mx.array | None = None
    drafted: int = 0
    accepted: int = 0


@dataclass
class Proposal:
    drafts: list[int]
    q: np.ndarray | None  # (k, V) for a sampled row


class Drafter:
    """The head's draft model: one cache per request, proposals, acceptance stats.

    ``fail_after`` (tests): the draft raises after this many proposals.
    """

    def __init__(
        self,
        model: Any,
        k_max: int,
        *,
        prefill_step: int = 512,
        fail_after: int = 0,
        on_failure: Callable[[str], None] | None = None,
    ):
        if k_max < 1:
            raise ValueError("--num-draft-tokens must be at least 1")
        self.model = model
        self.k_max = k_max
        self.prefill_step = prefill_step
        self.fail_after = fail_after
        self.on_failure = on_failure
        # Step costs by the lane's rows: a verify step of four rows is weighed
        # against a plain step of four, so drafting stops where batches make
        # verification dear.
        self._costs: dict[int, Costs] = {}
        self.trace: Any = None  # the head's lockstep.StepTrace, when profiling
        self.failed = ""
        self._states: dict[int, _DraftState] = {}
        self.proposals = 0
        self.drafted_total = 0
        self.accepted_total = 0
        self.verifies_total = 0
        self.verify_tokens_total = 0  # tokens the verify steps yielded

    # -- the scheduler's calls ----------------------------------------------------

    @property
    def costs(self) -> Costs:
        """The step costs of one-row lanes."""
        return self.costs_for(1)

    def costs_for(self, rows: int) -> Costs:
        """The step costs of lanes of ``rows`` rows."""
        return self._costs.setdefault(rows, Costs())

    def draft_count(self, rid: int, sampling: Sampling, rows: int = 1) -> int:
        """How many tokens to draft for this request's next step (0: a plain step),
        in a lane of ``rows`` rows."""
        if self.failed:
            return 0
        state = self._state(rid, sampling)
        return state.policy.choose(self.costs_for(rows))

    def all_resting(self, rids: Sequence[int], rows: int) -> bool:
        """Whether every row's next step is a plain one whatever the costs (inside a
        pause, a measuring step, or drafting failed), so that the head may chain
        it on tokens in flight; only then is it counted as one of each request's
        steps.

        Measuring steps chain too: drafting is weighed against what a plain
        token costs when steps chain, as they do while a request does not draft.
        """
        if self.failed:
            return True
        costs = self.costs_for(rows)
        policies = []
        for rid in rids:
            state = self._states.get(rid)
            if state is None:
                return False
            policy = state.policy
            step = policy.steps + 1
            if not (
                step < policy.paused_until
                or costs.plain_samples < PLAIN_PROBES
                or step % REPROBE == 0
            ):
                return False
            policies.append(policy)
        for policy in policies:
            policy.steps += 1
        return True

    def propose(self, rid: int, seq: Sequence[int], k: int, sampling: Sampling) -> Proposal | None:
        """``k`` drafts after ``seq`` (the prompt and every token generated), or None
        when the draft failed (drafting is then off for good)."""
        try:
            self.proposals += 1
            if self.fail_after and self.proposals > self.fail_after:
                raise RuntimeError(f"injected draft failure after {self.fail_after} proposals")
            began = time.monotonic()
            proposal = self._propose(self._state(rid, sampling), seq, k, sampling)
            if self.trace is not None:
                self.trace.add(began, "draft", None, k)
            return proposal
        except Exception as e:  # a draft that breaks must never break the request
            self.failed = f"{type(e).__name__}: {e}"
            log.exception("the draft model failed; decoding goes on without it")
            self._states.clear()
            if self.on_failure is not None:
                self.on_failure(self.failed)
            return None

    def _new_policy(self) -> DraftPolicy:
        """A new request's policy: it starts from what this draft has shown on the
        requests before it, once it has shown something. A draft that rarely
        agrees so costs a request one verify step of one draft before it
        pauses, not ``EVIDENCE`` (on 96-token CPU requests that was 7%)."""
        if self.verifies_total < EVIDENCE:
            return DraftPolicy(self.k_max)
        return DraftPolicy(self.k_max, acceptance=self.acceptance, evidence=1)

    @property
    def acceptance(self) -> float:
        """Accepted per drafted token, over every request so far (the prior before any)."""
        if not self.drafted_total:
            return PRIOR_ACCEPTANCE
        return self.accepted_total / self.drafted_total

    def row_verified(self, rid: int, k: int, accepted: int) -> None:
        """What one row's ``k`` drafts came to."""
        state = self._states.get(rid)
        if state is not None:
            state.policy.record(k, accepted)
            state.drafted += k
            state.accepted += accepted
        self.drafted_total += k
        self.accepted_total += accepted

    def step_verified(self, rows: int, k: int, seconds: float, produced: int) -> None:
        """A verify step of ``rows`` rows, ``k`` drafts wide, took ``seconds``."""
        self.costs_for(rows).verify_step(k, seconds)
        self.verifies_total += 1
        self.verify_tokens_total += produced

    def plain_step(self, seconds: float, rows: int = 1) -> None:
        self.costs_for(rows).plain_step(seconds)

    def warm_up(self, prompt_tokens: int) -> None:
        """Run the draft at the shapes of a request's first proposals (a prompt
        of ``prompt_tokens``, then one token at a time), so that an accelerator
        compiles their kernels at load rather than in a request."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        logits = self.model(mx.zeros((1, max(prompt_tokens, 1)), dtype=mx.int32), cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)[:, None]
        for _ in range(2):
            token = mx.argmax(self.model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.eval(token)

    def usage(self, rid: int) -> tuple[int, int]:
        """(drafted, accepted) tokens of one request so far."""
        state = self._states.get(rid)
        return (state.drafted, state.accepted) if state is not None else (0, 0)

    def release(self, rid: int) -> None:
        self._states.pop(rid, None)

    def accept(
        self, rid: int, proposal: Proposal | None, result: list[Any], sampled: bool = False
    ) -> list[int]:
        """Tokens a verify step yields for this request, from what the last rank
        returned: the target's tokens, or its probability rows for a sampled row.
        A row that drafted nothing (``proposal`` None) in a verify step of other
        rows gets the target's next token, as from a plain step."""
        if proposal is None:
            drafts: list[int] = []
            q = None if not sampled else np.zeros((0, len(result[0])))
        else:
            drafts, q = proposal.drafts, proposal.q
        if q is None:
            return accept_greedy(drafts, [int(t) for t in result])
        state = self._states.get(rid)
        rng = state.rng if state is not None else np.random.default_rng()
        return accept_sampled(drafts, q, np.asarray(result, np.float64), rng)

    # -- internals -------------------------------------------------------------

    def _state(self, rid: int, sampling: Sampling) -> _DraftState:
        state = self._states.get(rid)
        if state is None:
            from mlx_lm.models.cache import make_prompt_cache

            state = _DraftState(make_prompt_cache(self.model), policy=self._new_policy())
            state.rng = np.random.default_rng(sampling.seed)
            state.key = mx.random.key(sampling.seed)
            self._states[rid] = state
        return state

    def _propose(
        self, state: _DraftState, seq: Sequence[int], k: int, sampling: Sampling
    ) -> Proposal:
        from mlx_lm.models.cache import trim_prompt_cache

        common = 0
        for a, b in zip(state.fed, seq, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(seq) - 1)  # feed at least one token, for its logits
        if len(state.fed) > common:
            trim_prompt_cache(state.cache, len(state.fed) - common)
        state.fed = list(seq[:common])
        todo = list(seq[common:])
        while len(todo) > self.prefill_step:
            self.model(mx.array(todo[: self.prefill_step])[None], cache=state.cache)
            mx.eval([c.state for c in state.cache])
            state.fed += todo[: self.prefill_step]
            todo = todo[self.prefill_step :]
        logits = self.model(mx.array(todo)[None], cache=state.cache)[:, -1, :]
        state.fed += todo
        sampled = sampling.temperature > 0
        tokens: list[mx.array] = []
        qs: list[mx.array] = []
        for i in range(k):
            if sampled:
                assert state.key is not None
                state.key, sub = mx.random.split(state.key)
                q = sampling_probs(logits, sampling)  # (1, V)
                token = mx.random.categorical(mx.log(q), key=sub)
                qs.append(q)
            else:
                token = mx.argmax(logits, axis=-1)
            token = token.astype(mx.int32)
            tokens.append(token)
            if i < k - 1:
                logits = self.model(token[:, None], cache=state.cache)[:, -1, :]
        drafts_array = mx.concatenate(tokens)
        q_all = mx.concatenate(qs) if qs else None
        mx.eval(drafts_array, q_all if q_all is not None else [], [c.state for c in state.cache])
        drafts = cast(list[int], drafts_array.tolist())
        state.fed += drafts[:-1]
        return Proposal(drafts, np.array(q_all, dtype=np.float64) if q_all is not None else None)


def check_draft(
    target_name: str,
    draft_name: str,
    target_tokenizer: Any,
    draft_tokenizer: Any,
    kinds: Sequence[tuple[str, Any]],
    draft_cache: Sequence[Any],
) -> None:
    """Refuse a draft that cannot serve this target, saying why (``DraftRefused``)."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise DraftRefused(
            f"the draft model {draft_name} has a different tokenizer from {target_name} "
            f"({len(draft_tokenizer.get_vocab())} vs {len(target_tokenizer.get_vocab())} "
            "tokens, or the same count mapped differently): a draft must share the "
            "target's vocabulary"
        )
    untrimmable = sorted({name for name, _ in kinds if name != "KVCache"})
    if untrimmable:
        raise DraftRefused(
            f"{target_name} keeps {', '.join(untrimmable)} caches, which cannot drop "
            "rejected draft positions: speculative decoding needs a model whose every "
            "layer has a plain KV cache; run it without --draft-model"
        )
    draft_kinds = sorted({type(c).__name__ for c in draft_cache} - {"KVCache"})
    if draft_kinds:
        raise DraftRefused(
            f"the draft model {draft_name} keeps {', '.join(draft_kinds)} caches, which "
            "cannot be rolled back: pick a draft whose layers all have plain KV caches"
        )
