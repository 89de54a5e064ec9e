"""A restarted coordinator adopts the running load even when one of its ranks
answers Bonjour late: it waits (bounded) for every rank of a load it could
adopt instead of reloading the model on the workers found first."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from clusterkit import coordinator_stub, local_cluster, wait_serving
from modelfactory import make_model

from pomona.v1 import coordinator_pb2

pytestmark = pytest.mark.cluster


def _load_id(coord) -> str:  # type: ignore[no-untyped-def]
    return coordinator_stub(coord).Status(coordinator_pb2.StatusRequest(), timeout=10).load_id


def test_a_restarted_coordinator_waits_for_a_late_rank_and_adopts(tmp_path: Path) -> None:
    model = make_model(tmp_path / "qwen3", "qwen3", num_layers=6)
    with local_cluster(tmp_path) as kit:
        workers = [kit.worker(f"w{i}") for i in range(3)]
        coord = kit.coordinator(str(model), min_workers=3)
        wait_serving(coord)
        before = _load_id(coord)
        coord.stop(signal.SIGKILL)
        # One worker's daemon cannot answer Bonjour or Describe for 3 s (its
        # runner goes on): as a Mac on a busy network answers late.
        late = workers[2]
        os.kill(late.popen.pid, signal.SIGSTOP)
        try:
            coord = kit.coordinator(str(model), min_workers=1)
            time.sleep(3.0)
        finally:
            os.kill(late.popen.pid, signal.SIGCONT)
        wait_serving(coord, timeout=120)
        assert _load_id(coord) == before, kit.logs()  # adopted, not reloaded
