from __future__ import annotations

from pathlib import Path

from pomona.worker.identity import load_node_id, machine_fingerprint


def test_node_id_survives_a_restart(tmp_path: Path) -> None:
    assert load_node_id(tmp_path, "machine-a") == load_node_id(tmp_path, "machine-a")


def test_a_copied_state_directory_does_not_clone_the_id(tmp_path: Path) -> None:
    first = load_node_id(tmp_path, "machine-a")
    assert load_node_id(tmp_path, "machine-b") != first


def test_fingerprint_is_stable() -> None:
    assert machine_fingerprint() == machine_fingerprint()
