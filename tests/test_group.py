"""Joining an MLX group: a backend that cannot form says so as a group failure."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from pomona.worker.group import GroupError, join_group


def test_a_backend_this_mlx_lacks_is_a_group_error_in_mlx_words() -> None:
    with pytest.raises(GroupError, match=r"init\(backend='jaccl'\) raised: Cannot initialize"):
        join_group("jaccl-ring", 0, 2, timeout=30)


def test_an_init_that_never_returns_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # As JACCL waiting on a coordinator no rank can reach: init blocks.
    release = threading.Event()
    monkeypatch.setattr(mx.distributed, "init", lambda **_: release.wait())
    try:
        with pytest.raises(GroupError, match=r"init\(backend='nccl'\) did not return within 0 s"):
            join_group("nccl", 1, 2, timeout=0.2)
    finally:
        release.set()
