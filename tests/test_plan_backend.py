"""`pomona plan` says which backend the coordinator would use, and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_plan_cli import LLAMA_70B

from pomona.coordinator.backend_choice import described_facts
from pomona.coordinator.plan_cli import plan_command

STUDIOS = """
nodes:
  - {name: studio, chip: "Apple M2 Ultra", memory_gb: 192, count: 4, rdma: true}
"""
CHAIN = "rdma_cables: [[studio-1, studio-2], [studio-2, studio-3], [studio-3, studio-4]"
RING = CHAIN + ", [studio-4, studio-1]]\n"
MESH_LESS_ONE = CHAIN + "]\n"


def plan(tmp_path: Path, nodes: str, *args: str) -> dict[str, object]:
    model = tmp_path / "llama-70b.json"
    model.write_text(json.dumps(LLAMA_70B))
    lab = tmp_path / "lab.yaml"
    lab.write_text(nodes)
    result = CliRunner().invoke(
        plan_command,
        [str(model), "--nodes", str(lab), "--objective", "throughput", "--json", *args],
    )
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


def test_rdma_between_every_pair_plans_jaccl(tmp_path: Path) -> None:
    data = plan(tmp_path, STUDIOS)
    assert data["backend"] == "jaccl" and "every pair" in str(data["backend_reason"])


def test_only_a_ring_of_cables_plans_jaccl_ring_and_says_so(tmp_path: Path) -> None:
    data = plan(tmp_path, STUDIOS + RING)
    assert data["backend"] == "jaccl-ring"
    reason = str(data["backend_reason"])
    assert "only a ring" in reason and "mesh needs a cable between every pair" in reason


def test_a_chain_of_cables_plans_the_tcp_ring_naming_the_missing_pair(tmp_path: Path) -> None:
    data = plan(tmp_path, STUDIOS + MESH_LESS_ONE)
    assert data["backend"] == "ring" and "studio-1-studio-4" in str(data["backend_reason"])


def test_the_table_shows_the_backend_and_a_forced_one_with_its_risk(tmp_path: Path) -> None:
    model = tmp_path / "llama-70b.json"
    model.write_text(json.dumps(LLAMA_70B))
    lab = tmp_path / "lab.yaml"
    lab.write_text(STUDIOS.replace("rdma: true", "rdma: false"))
    args = [str(model), "--nodes", str(lab), "--objective", "throughput"]
    out = CliRunner().invoke(plan_command, args).output
    assert "backend: ring (TCP: RDMA is not enabled on studio-1" in out
    out = CliRunner().invoke(plan_command, [*args, "--backend", "jaccl"]).output
    assert "backend: jaccl (as asked" in out and "the ring takes over" in out


def test_cables_naming_unknown_nodes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown nodes: nope"):
        described_facts([("a", True)], [("a", "nope")])
