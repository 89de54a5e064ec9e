"""A worker's lease: one coordinator loads and unloads it at a time."""

from __future__ import annotations

from pomona.worker.lease import Lease


def test_a_second_coordinator_is_refused_while_the_first_renews() -> None:
    lease = Lease(ttl=10.0)
    assert lease.claim("a", now=0.0) == ""
    assert lease.claim("b", now=5.0) == "a"
    assert lease.claim("a", now=9.0) == ""  # renewed
    assert lease.claim("b", now=18.0) == "a"
    assert lease.live_holder(now=18.0) == "a"


def test_the_lease_lapses_after_the_holders_last_heartbeat() -> None:
    lease = Lease(ttl=10.0)
    lease.claim("a", now=0.0)
    assert lease.claim("b", now=10.5) == ""
    assert lease.live_holder(now=11.0) == "b"


def test_a_closed_stream_frees_the_lease_at_once_but_only_its_own() -> None:
    lease = Lease(ttl=10.0)
    lease.claim("a", now=0.0)
    lease.release("b")
    assert lease.live_holder(now=1.0) == "a"
    lease.release("a")
    assert lease.claim("b", now=1.0) == ""


def test_an_anonymous_caller_never_takes_the_lease() -> None:
    lease = Lease()
    assert lease.claim("", now=0.0) == ""
    assert lease.live_holder(now=0.0) == ""
    lease.claim("a", now=0.0)
    assert lease.claim("", now=1.0) == "a"
