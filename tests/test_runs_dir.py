"""A worker keeps the runner logs and host files of its last few loads only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pomona.worker.runs_dir import RUNS_KEPT, prune_runs


def make_runs(directory: Path, count: int) -> list[str]:
    """``count`` loads, oldest first, each with its log and host file."""
    directory.mkdir(parents=True, exist_ok=True)
    load_ids = [f"load{i:02d}" for i in range(count)]
    for i, load_id in enumerate(load_ids):
        for name in (f"runner-{load_id}.log", f"hosts-{load_id}.json"):
            (directory / name).write_text("x")
            os.utime(directory / name, (1_000 + i, 1_000 + i))
    return load_ids


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_only_the_latest_loads_and_the_current_one_are_kept(tmp_path: Path) -> None:
    load_ids = make_runs(tmp_path, 9)
    (tmp_path / "notes.txt").write_text("not a run's")
    deleted = prune_runs(tmp_path, keep=3, current=load_ids[0])
    kept = [load_ids[0], *load_ids[-3:]]
    expected = {f"runner-{i}.log" for i in kept} | {f"hosts-{i}.json" for i in kept}
    assert names(tmp_path) == expected | {"notes.txt"}
    assert len(deleted) == 2 * 5


def test_a_load_counts_by_its_newest_file(tmp_path: Path) -> None:
    load_ids = make_runs(tmp_path, 4)
    os.utime(tmp_path / f"runner-{load_ids[0]}.log", (2_000, 2_000))  # still logging
    prune_runs(tmp_path, keep=1)
    assert names(tmp_path) == {f"runner-{load_ids[0]}.log", f"hosts-{load_ids[0]}.json"}


def test_a_missing_directory_is_nothing_to_prune(tmp_path: Path) -> None:
    assert prune_runs(tmp_path / "none") == []


@pytest.mark.cluster
def test_a_worker_starting_prunes_the_loads_of_earlier_runs(tmp_path: Path) -> None:
    from clusterkit import describe, local_cluster, wait_for

    runs = tmp_path / "state-w0" / "runs"
    load_ids = make_runs(runs, RUNS_KEPT + 7)
    with local_cluster(tmp_path) as c:
        worker = c.worker("w0")
        wait_for(lambda: describe(worker), 60, "the worker")
        kept = load_ids[-RUNS_KEPT:]
        assert names(runs) == {f"runner-{i}.log" for i in kept} | {f"hosts-{i}.json" for i in kept}
