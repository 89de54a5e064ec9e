"""The head's schedule, without MLX: chunked prefill, stops, streaming text."""

from __future__ import annotations

import pytest

from pomona.worker.lockstep import Sampling, Step, decode_ctrl, encode_ctrl
from pomona.worker.scheduler import (
    Delta,
    Done,
    Finish,
    GenRequest,
    QueueFull,
    Scheduler,
    StopMatcher,
)


class CharDetokenizer:
    """Token t is the character chr(t)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0

    def add_token(self, t: int) -> None:
        self.text += chr(t)

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


EOS = 0


def make(
    prefill_step: int = 4, max_queue: int = 8, lanes: int = 1, max_batch: int = 16
) -> Scheduler:
    return Scheduler(
        CharDetokenizer,
        [EOS],
        prefill_step=prefill_step,
        max_queue=max_queue,
        lanes=lanes,
    )


def drain(req: GenRequest) -> list[Delta | Done]:
    out = []
    while not req.events.empty():
        out.append(req.events.get())
    return out


def run(s: Scheduler, replies: list[int]) -> list[Step]:
    """Drive a single request, answering each decode step with the next reply."""
    steps = []
    replies = list(replies)
    while (step := s.next_step()) is not None:
        steps.append(step)
        if step.tokens:  # a step of prefix-cache bookkeeping computes nothing
            s.on_tokens(step, [replies.pop(0)])
    return steps


def answer(s: Scheduler, step: Step, token: int = ord("x")) -> None:
    if not step.prefill:
        s.on_tokens(step, [token] * len(step.tokens))


def test_prefill_is_chunked_and_the_last_prompt_token_is_fed_in_the_join_step() -> None:
    s = make(prefill_step=4)
    req = GenRequest("r", list(range(1, 11)), max_tokens=2)
    s.submit(req)
    steps = run(s, [ord("a"), ord("b")])
    assert [st.chunk for st in steps[:3]] == [((1, 2, 3, 4),), ((5, 6, 7, 8),), ((9,),)]
    assert [st.new_group for st in steps[:3]] == [True, False, False]
    join, decode = steps[3:]
    assert not join.prefill and join.tokens == (10,) and join.join == (Sampling(),)
    assert not decode.prefill and decode.tokens == (ord("a"),) and decode.join == ()
    events = drain(req)
    assert events[-1] == Done(Finish.LENGTH, 10, 2)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "ab"


def test_end_of_sequence_finishes_with_stop_and_is_not_emitted() -> None:
    s = make()
    req = GenRequest("r", [5, 6], max_tokens=10)
    s.submit(req)
    run(s, [ord("h"), ord("i"), EOS])
    events = drain(req)
    assert events[-1] == Done(Finish.STOP, 2, 2)
    assert [t for e in events if isinstance(e, Delta) for t in e.tokens] == [ord("h"), ord("i")]


def test_stop_string_cuts_text_before_it_even_across_tokens() -> None:
    s = make()
    req = GenRequest("r", [5], max_tokens=20, stop=("END",))
    s.submit(req)
    run(s, [ord(c) for c in "okEN"] + [ord("D")])
    events = drain(req)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "ok"
    assert events[-1].reason is Finish.STOP


def test_text_that_only_looks_like_a_stop_is_released() -> None:
    m = StopMatcher(["END"])
    assert m.push("xE") == ("x", False)
    assert m.push("N") == ("", False)
    assert m.push("x") == ("ENx", False)
    assert m.flush() == ""


def test_cancelled_request_finishes_and_leaves_its_lane_at_the_next_step() -> None:
    s = make()
    first = GenRequest("a", [1, 2], max_tokens=50)
    s.submit(first)
    st = s.next_step()
    assert st is not None and st.prefill and st.new_group
    st = s.next_step()
    assert st is not None and st.join and st.tokens == (2,)
    answer(s, st)
    second = GenRequest("b", [3], max_tokens=1)
    s.submit(second)
    first.cancel()
    st = s.next_step()  # a leaves; b (a one-token prompt) joins in the same step
    assert st is not None and st.remove == (0,) and st.tokens == (3,) and len(st.join) == 1
    answer(s, st, ord("z"))
    assert s.next_step() is None  # b is done too: the session ends
    assert drain(first)[-1].reason is Finish.CANCELLED
    assert drain(second)[-1] == Done(Finish.LENGTH, 1, 1)


def test_a_newcomer_prefills_between_decode_steps_of_its_lane() -> None:
    s = make(prefill_step=2)
    a = GenRequest("a", [1], max_tokens=3)
    b = GenRequest("b", [1, 2, 3, 4, 5, 6], max_tokens=2)
    s.submit(a)
    st = s.next_step()
    assert st is not None and not st.prefill and st.join
    answer(s, st)
    s.submit(b)
    kinds = []
    while (st := s.next_step()) is not None and len(kinds) < 8:
        size = len(st.chunk[0]) if st.prefill else len(st.tokens)
        kinds.append(f"{'P' if st.prefill else 'D'}{size}j{len(st.join)}r{len(st.remove)}")
        answer(s, st)
    # b's prompt but its last token (5 tokens) is fed 2, 2, 1, each chunk after
    # a decode step of a; a finishes with its 3rd token and leaves at the next
    # step; b joins with its last prompt token and decodes on.
    assert kinds == ["P2j0r0", "D1j0r0", "P2j0r0", "D1j0r0", "P1j0r1", "D1j1r0", "D1j0r0"]
    assert drain(a)[-1] == Done(Finish.LENGTH, 1, 3)
    assert drain(b)[-1] == Done(Finish.LENGTH, 6, 2)


def test_rows_that_finish_leave_by_index_before_the_next_step() -> None:
    s = make()
    reqs = [GenRequest(str(i), [1], max_tokens=2 + i) for i in range(3)]
    for r in reqs:
        s.submit(r)
    st = s.next_step()  # all three join at once: one-token prompts need no prefill
    assert st is not None and len(st.join) == 3
    answer(s, st)
    st = s.next_step()
    while st is not None and not st.remove:
        answer(s, st, ord("y"))
        st = s.next_step()
    assert st is not None and st.remove == (0,)


def test_simultaneous_arrivals_are_prefilled_together_and_spread_over_the_lanes() -> None:
    s = make(prefill_step=8, lanes=2)
    reqs = [GenRequest(str(i), list(range(1, 4 + i % 3)), max_tokens=4) for i in range(8)]
    for r in reqs:
        s.submit(r)
    first, second = s.next_step(), s.next_step()
    assert first is not None and second is not None
    assert (first.lane, second.lane) == (0, 1)
    assert first.prefill and second.prefill
    assert len(first.chunk) == len(second.chunk) == 4  # four each, one batched chunk
    assert first.chunk[1] == (1, 2, 3)  # all but the last prompt token
    join0, join1 = s.next_step(), s.next_step()
    assert join0 is not None and join1 is not None
    assert len(join0.join) == len(join1.join) == 4
    assert join0.tokens == (3, 4, 5, 3)  # each request's last prompt token
    # Both lanes have a step in flight: nothing more can start until one returns.
    assert s.next_step() is None
    answer(s, join0)
    st = s.next_step()
    assert st is not None and st.lane == 0 and st.tokens == (ord("x"),) * 4


def test_a_long_prompt_is_admitted_alone_in_chunks() -> None:
    s = make(prefill_step=4, lanes=1)
    long = GenRequest("long", list(range(1, 12)), max_tokens=1)
    short = GenRequest("short", [1, 2], max_tokens=1)
    s.submit(long)
    s.submit(short)
    st = s.next_step()
    assert st is not None and st.chunk == ((1, 2, 3, 4),)


def test_full_queue_refuses_with_a_clear_message() -> None:
    s = make(max_queue=2)
    s.submit(GenRequest("a", [1], 1))
    s.submit(GenRequest("b", [1], 1))
    with pytest.raises(QueueFull, match="queue is full"):
        s.submit(GenRequest("c", [1], 1))


def test_failure_ends_running_and_waiting_requests_with_the_reason() -> None:
    s = make()
    a, b = GenRequest("a", [1, 2], 5), GenRequest("b", [1], 5)
    s.submit(a)
    s.submit(b)
    assert s.next_step() is not None
    s.fail_all("rank 1 was lost")
    assert drain(a)[-1] == Done(Finish.ERROR, 2, 0, "rank 1 was lost")
    assert drain(b)[-1] == Done(Finish.ERROR, 1, 0, "rank 1 was lost")
    assert s.idle


@pytest.mark.parametrize(
    "sampling",
    [Sampling(), Sampling(0.7, 0.9, 40, 0.05, 2**61 + 12345), Sampling(temperature=1.5, seed=1)],
)
def test_control_vector_round_trips(sampling: Sampling) -> None:
    step = Step(1, prefill=False, tokens=(4, 5, 6), join=(sampling, Sampling()), remove=(0, 5))
    decoded = decode_ctrl(encode_ctrl(step))
    assert decoded is not None and not decoded.prefill and decoded.lane == 1
    assert len(decoded.tokens) == 3 and decoded.remove == (0, 5)
    got = decoded.join[0]
    assert got.seed == sampling.seed and got.top_k == sampling.top_k
    assert got.temperature == pytest.approx(sampling.temperature)
    assert got.top_p == pytest.approx(sampling.top_p)
    assert decoded.join[1] == Sampling()
    prefill = Step(0, prefill=True, chunk=((1, 2, 3), (4,)), new_group=True)
    back = decode_ctrl(encode_ctrl(prefill))
    assert back is not None and back.prefill and back.new_group
    assert [len(row) for row in back.chunk] == [3, 1]
    assert decode_ctrl(encode_ctrl(None)) is None


@pytest.mark.parametrize("prefill_step", [512, 2048])
def test_a_batched_prefill_step_holds_at_most_the_tokens_the_plan_budgets(
    prefill_step: int,
) -> None:
    """2048 tokens (the planner's activation budget), with 512-token chunks or
    with the 2048-token chunks of ranks that share one GPU."""
    s = make(prefill_step=prefill_step, lanes=1)
    for i in range(6):
        s.submit(GenRequest(str(i), [1] * 501, max_tokens=1))  # 500 tokens to prefill each
    st = s.next_step()
    assert st is not None and st.prefill
    assert len(st.chunk) == 4  # 4 x 500 <= 2048; a fifth would make 2500


def test_a_finished_row_makes_room_in_the_same_step() -> None:
    # One row per lane (a model that cannot batch): the next request joins in
    # the very step that drops the finished one, so the session never pauses.
    s = Scheduler(CharDetokenizer, [EOS], prefill_step=4, lanes=1, rows_per_lane=1)
    a, b = GenRequest("a", [1], max_tokens=1), GenRequest("b", [2], max_tokens=1)
    s.submit(a)
    s.submit(b)
    st = s.next_step()
    assert st is not None and st.tokens == (1,) and len(st.join) == 1
    answer(s, st)
    st = s.next_step()
    assert st is not None and st.remove == (0,) and st.tokens == (2,) and len(st.join) == 1
    answer(s, st)
    assert s.next_step() is None and s.idle


def test_removal_indices_stay_those_of_the_ranks_rows() -> None:
    s = make(lanes=1)
    reqs = [GenRequest(str(i), [1], max_tokens=(1, 9, 2)[i]) for i in range(3)]
    for r in reqs:
        s.submit(r)
    st = s.next_step()
    assert st is not None and len(st.join) == 3
    answer(s, st)  # row 0 finished
    reqs[1].cancel()  # row 1 cancelled before the next step
    st = s.next_step()
    assert st is not None and st.remove == (0, 1) and st.tokens == (ord("x"),)


def test_a_control_vector_out_of_step_is_named_not_misread() -> None:
    from pomona.worker.lockstep import CTRL_LEN, Desynchronized

    # What a rank read when it took a neighbour's activations for control.
    garbage = [-1114464048, -1093116217, -1098602321, 1069046730] + [7] * (CTRL_LEN - 4)
    with pytest.raises(Desynchronized, match="disagree"):
        decode_ctrl(garbage)
    with pytest.raises(Desynchronized):
        decode_ctrl([0] * CTRL_LEN)  # no magic: not a leave either


def test_the_step_watchdog_follows_the_measured_pace() -> None:
    from pomona.worker.lockstep import StepWatch

    watch = StepWatch(first=60.0, floor=5.0, factor=3.0)
    watch.begin(8)
    assert watch.budget == 60.0  # nothing measured yet
    watch.since = 100.0
    watch.end(8)  # ~seconds per token measured against a fake start
    pace = max(watch._paces)
    watch.begin(1000)  # a long prefill chunk gets more time
    assert watch.budget == max(5.0, 3.0 * pace * 1000)
    watch.begin(1)
    assert watch.budget >= 5.0
    assert watch.overdue(watch.since + watch.budget - 1) < 0
    assert watch.overdue(watch.since + watch.budget + 1) > 0
    watch.idle()
    assert watch.overdue(1e12) < 0


def test_the_prefix_cache_keeps_finished_rows_and_a_later_prompt_restores_them() -> None:
    from pomona.worker.prefix_cache import PrefixCache

    cache = PrefixCache(10_000, 1, min_tokens=4)
    s = Scheduler(CharDetokenizer, [EOS], prefill_step=4, prefix_cache=cache)
    prompt = list(range(1, 11))
    s.submit(GenRequest("a", prompt, max_tokens=3))
    steps = run(s, [ord("a"), ord("b"), ord("c")])
    # The lane empties: one last step keeps the row (its prompt and the two
    # generated tokens fed back; "c" never was) and removes it.
    last = steps[-1]
    assert (last.store, last.remove, last.tokens, last.prefill) == (((0, 1),), (0,), (), False)
    assert cache.entries == 1 and cache.tokens == 12 + 1

    second = GenRequest("b", [*prompt, ord("a"), 50, 51, 52], max_tokens=1)
    s.submit(second)
    steps = run(s, [ord("z")])
    first = steps[0]
    assert first.new_group and first.restore == (1, 11) and first.chunk == ((50, 51),)
    assert not steps[1].prefill and steps[1].tokens == (52,) and steps[1].restore is None
    assert drain(second)[-1] == Done(Finish.LENGTH, 14, 1, cached_tokens=11)

    # A cancelled request is not kept.
    third = GenRequest("c", [60, 61, 62, 63, 64, 65, 66], max_tokens=5)
    s.submit(third)
    while (step := s.next_step()) is not None and step.prefill:
        pass
    assert step is not None and step.join
    s.on_tokens(step, [ord("x")])
    third.cancel()
    kept = cache.entries
    while (step := s.next_step()) is not None:
        assert not step.store
    assert cache.entries == kept and drain(third)[-1].reason is Finish.CANCELLED


def chaining(lanes: int = 2) -> Scheduler:
    return Scheduler(CharDetokenizer, [EOS], prefill_step=4, lanes=lanes, chain=True)


def join_then_chain(s: Scheduler, req: GenRequest) -> tuple[Step, Step]:
    """Submit a short request; its join step and the step chained behind it."""
    s.submit(req)
    assert s.next_step().prefill  # type: ignore[union-attr]
    join = s.next_step()
    chained = s.next_step()  # before the join's token is in
    assert join is not None and join.join and not join.chained
    assert chained is not None and chained.chained and chained.lane == join.lane
    return join, chained


def test_a_lone_lane_launches_its_next_decode_step_on_tokens_in_flight() -> None:
    s = chaining()
    req = GenRequest("r", [5, 6], max_tokens=3)
    join, first = join_then_chain(s, req)
    assert first.tokens == (0,) and first.lane == 0
    assert s.next_step() is None  # one chained step at most
    s.on_tokens(join, [ord("a")])
    second = s.next_step()
    assert second is not None and second.chained
    s.on_tokens(first, [ord("b")])
    s.on_tokens(second, [ord("c")])
    assert s.next_step() is None  # max_tokens reached: the row leaves, the lane empties
    events = drain(req)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "abc"
    assert events[-1] == Done(Finish.LENGTH, 2, 3)


def test_a_row_that_finished_stops_the_chain_and_its_extra_token_is_dropped() -> None:
    s = chaining()
    req = GenRequest("r", [5, 6], max_tokens=10)
    join, chained = join_then_chain(s, req)
    s.on_tokens(join, [EOS])
    assert s.next_step() is None  # the row is done: nothing more is chained
    s.on_tokens(chained, [ord("q")])
    assert s.next_step() is None
    events = drain(req)
    assert events == [Done(Finish.STOP, 2, 0)]


def test_a_waiting_request_or_a_second_lane_at_work_stops_the_chain() -> None:
    s = chaining()
    a = GenRequest("a", [5, 6], max_tokens=10)
    s.submit(a)
    s.next_step()
    join = s.next_step()
    assert join is not None and join.lane == 0
    s.submit(GenRequest("b", [7, 8], max_tokens=10))
    newcomer = s.next_step()  # b is admitted to the idle lane, not chained behind a
    assert newcomer is not None and newcomer.prefill and newcomer.lane == 1
    b_join = s.next_step()
    assert b_join is not None and b_join.lane == 1 and not b_join.chained
    assert s.next_step() is None  # two lanes at work: each waits for its tokens
    s.on_tokens(join, [ord("x")])
    step = s.next_step()
    assert step is not None and step.lane == 0 and not step.chained


def test_a_cancelled_row_stops_the_chain() -> None:
    s = chaining(lanes=1)
    req = GenRequest("r", [5, 6], max_tokens=10)
    join, chained = join_then_chain(s, req)
    req.cancel()
    s.on_tokens(join, [ord("a")])
    assert s.next_step() is None
    s.on_tokens(chained, [ord("b")])
    assert s.next_step() is None  # reaped: the row leaves with the session
    assert drain(req)[-1].reason is Finish.CANCELLED


def test_a_next_turn_sent_while_a_chained_step_is_in_flight_finds_the_first_turn_kept() -> None:
    from pomona.worker.prefix_cache import PrefixCache

    s = Scheduler(
        CharDetokenizer,
        [EOS],
        prefill_step=64,
        lanes=2,
        chain=True,
        prefix_cache=PrefixCache(100_000, 1),
    )
    history = list(range(10, 50))
    join, chained = join_then_chain(s, GenRequest("first", history, max_tokens=1))
    s.on_tokens(join, [ord("a")])  # the first turn is done: its client sends the next
    s.submit(GenRequest("second", [*history, ord("a"), 60, 61], max_tokens=2))
    assert s.next_step() is None  # not admitted before the first turn's KV is kept
    s.on_tokens(chained, [ord("b")])
    kept = s.next_step()
    assert kept is not None and kept.remove == (0,) and len(kept.store) == 1
    restored = s.next_step()
    assert restored is not None and restored.prefill and restored.restore is not None
    assert restored.restore[1] >= len(history)
