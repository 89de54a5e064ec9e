"""What the head runner chooses from where its ranks run: the prefill chunk
(unless --prefill-step sets it) and whether requests share one lane."""

from __future__ import annotations

from pomona.worker.runner import (
    PREFILL_STEP,
    SHARED_GPU_PREFILL_STEP,
    prefill_step_for,
    shares_one_gpu,
)


def test_ranks_share_one_gpu_only_on_a_gpu_and_one_host() -> None:
    local = ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")
    assert shares_one_gpu(local, on_gpu=True)
    assert not shares_one_gpu(local, on_gpu=False)  # CPU ranks: a core each
    macs = ("198.18.0.2:7001", "198.18.0.3:7001")
    assert not shares_one_gpu(macs, on_gpu=True)  # a GPU each
    assert shares_one_gpu(("[fe80::1]:7001", "[fe80::1]:7002"), on_gpu=True)
    assert shares_one_gpu(("198.18.0.2:7001",), on_gpu=True)  # one rank


def test_the_prefill_chunk_is_as_asked_else_by_where_the_ranks_run() -> None:
    assert prefill_step_for(256, shared_gpu=True) == 256
    assert prefill_step_for(0, shared_gpu=False) == PREFILL_STEP == 512
    assert prefill_step_for(0, shared_gpu=True) == SHARED_GPU_PREFILL_STEP == 2048
