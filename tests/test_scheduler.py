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


def make(prefill_step: int = 4, max_queue: int = 8) -> Scheduler:
    return Scheduler(CharDetokenizer, [EOS], prefill_step=prefill_step, max_queue=max_queue)


def drain(req: GenRequest) -> list[Delta | Done]:
    out = []
    while not req.events.empty():
        out.append(req.events.get())
    return out


def run(s: Scheduler, replies: list[int]) -> list[Step]:
    """Drive a single request, answering each sampling step with the next reply."""
    steps = []
    replies = list(replies)
    while (step := s.next_step()) is not None:
        steps.append(step)
        if step.sample:
            s.on_tokens([replies.pop(0)])
    return steps


def test_prefill_is_chunked_and_the_last_prompt_token_is_fed_alone() -> None:
    s = make(prefill_step=4)
    req = GenRequest("r", list(range(1, 11)), max_tokens=2)
    s.submit(req)
    steps = run(s, [ord("a"), ord("b")])
    assert [list(st.tokens) for st in steps] == [[1, 2, 3, 4], [5, 6, 7, 8], [9], [10], [97]]
    assert [st.prefill for st in steps] == [True, True, True, True, False]
    assert [st.sample for st in steps] == [False, False, False, True, True]
    assert [st.new_sequence for st in steps] == [True, False, False, False, False]
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


def test_cancelled_request_finishes_and_the_next_one_starts_fresh() -> None:
    s = make()
    first = GenRequest("a", [1, 2], max_tokens=50)
    second = GenRequest("b", [3], max_tokens=1)
    s.submit(first)
    s.submit(second)
    step = s.next_step()
    assert step is not None and step.new_sequence
    first.cancel()
    step = s.next_step()
    assert step is not None and list(step.tokens) == [3] and step.new_sequence
    s.on_tokens([ord("z")])
    step = s.next_step()  # the finished row leaves; nothing else to do
    assert step is None
    assert drain(first)[-1].reason is Finish.CANCELLED
    assert drain(second)[-1] == Done(Finish.LENGTH, 1, 1)


def test_newcomers_join_the_batch_and_prefill_alternates_with_decode() -> None:
    s = make(prefill_step=2)
    a = GenRequest("a", [1], max_tokens=3)
    b = GenRequest("b", [1, 2, 3, 4, 5], max_tokens=2)
    s.submit(a)
    st = s.next_step()
    assert st is not None and st.prefill and st.sample
    s.on_tokens([ord("a")])
    s.submit(b)
    kinds = []
    for _ in range(6):
        st = s.next_step()
        if st is None:
            break
        kinds.append(("P" if st.prefill else "D") + str(len(st.tokens)) + "r" + str(len(st.remove)))
        if st.sample:
            s.on_tokens([ord("x")] * (1 if st.prefill else len(st.tokens)))
    # b's prompt (5 tokens) is fed 2, 2, then 1 that samples, each chunk after a
    # decode step of a; a finishes with its 3rd token and leaves at the next
    # step; b joins when its first token is sampled and decodes on.
    assert kinds == ["D1r0", "P2r0", "D1r0", "P2r1", "P1r0", "D1r0"]
    assert drain(a)[-1] == Done(Finish.LENGTH, 1, 3)
    assert drain(b)[-1] == Done(Finish.LENGTH, 5, 2)


def test_rows_that_finish_leave_by_index_before_the_next_step() -> None:
    s = make()
    reqs = [GenRequest(str(i), [1], max_tokens=2 + i) for i in range(3)]
    for r in reqs:
        s.submit(r)
    for _ in range(3):  # admit all three (one prefill step each, decodes between)
        st = s.next_step()
        assert st is not None
        s.on_tokens([ord("x")] * (1 if st.prefill else len(st.tokens)))
    st = s.next_step()
    while st is not None and not st.remove:
        s.on_tokens([ord("y")] * len(st.tokens))
        st = s.next_step()
    assert st is not None and st.remove == (0,)


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
    s.next_step()
    s.fail_all("rank 1 was lost")
    assert drain(a)[-1] == Done(Finish.ERROR, 2, 0, "rank 1 was lost")
    assert drain(b)[-1] == Done(Finish.ERROR, 1, 0, "rank 1 was lost")
    assert s.idle


@pytest.mark.parametrize(
    "sampling",
    [Sampling(), Sampling(0.7, 0.9, 40, 0.05, 2**61 + 12345), Sampling(temperature=1.5, seed=1)],
)
def test_control_vector_round_trips(sampling: Sampling) -> None:
    step = Step([1, 2, 3], prefill=True, sample=True, new_sequence=True, sampling=sampling,
                remove=(0, 5))  # fmt: skip
    decoded = decode_ctrl(encode_ctrl(step))
    assert decoded is not None and decoded.prefill and decoded.sample and decoded.new_sequence
    assert len(decoded.tokens) == 3 and decoded.remove == (0, 5)
    assert decoded.sampling.seed == sampling.seed
    assert decoded.sampling.top_k == sampling.top_k
    assert decoded.sampling.temperature == pytest.approx(sampling.temperature)
    assert decode_ctrl(encode_ctrl(None)) is None
