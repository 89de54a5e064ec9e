"""A backend that cannot form its group falls back to the ring, on a real cluster.

This machine's MLX has no JACCL (Linux, CPU): asked for `--backend jaccl`, each
runner's `mx.distributed.init` raises; the coordinator records why, loads the same
plan over the ring, and serves single-process mlx-lm's greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from clusterkit import (
    coordinator_stub,
    describe,
    generate_tokens,
    local_cluster,
    reference_tokens,
    wait_serving,
)
from modelfactory import make_model

from pomona.cli import main
from pomona.coordinator.plan_cli import plan_command
from pomona.v1 import coordinator_pb2

pytestmark = pytest.mark.cluster

PROMPT = "Thunderbolt joins the two machines and"


def test_jaccl_that_cannot_form_falls_back_to_ring_and_serves_the_same_tokens(
    tmp_path: Path,
) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4, seed=3)
    expected = reference_tokens(model, PROMPT, 16)
    with local_cluster(tmp_path) as c:
        workers = [c.worker("w0"), c.worker("w1")]
        coord = c.coordinator(str(model), min_workers=2, layers="2,2", extra=("--backend", "jaccl"))
        reply = wait_serving(coord, timeout=180)
        assert sorted(n.shard.backend for n in reply.nodes) == ["ring", "ring"]
        events = list(coordinator_stub(coord).Events(coordinator_pb2.EventsRequest(), timeout=10))
        kinds = [e.kind for e in events]
        assert kinds.count("backend_fallback") == 1, kinds
        fallback = next(e for e in events if e.kind == "backend_fallback")
        assert "the jaccl group did not form" in fallback.message
        assert "jaccl" in fallback.message.split("(", 1)[1]  # MLX's own words follow
        plans = [e.message for e in events if e.kind == "plan_changed"]
        assert "backend jaccl (as asked" in plans[0] and "backend ring" in plans[-1]
        assert generate_tokens(coord, PROMPT, max_tokens=16)[0] == expected
        # What the workers report: no RDMA here (n/a), no CUDA.
        facts = describe(workers[0]).backend_facts
        assert facts.rdma_status == "" and not facts.rdma_devices and not facts.cuda
        # The runner of the failed load was given MLX's JACCL files and variables.
        runs = c.state_dir("w0") / "runs"
        matrices = [json.loads(p.read_text()) for p in runs.glob("ibv-devices-*.json")]
        assert matrices == [[[None, None], [None, None]]]
        # `pomona plan` on the running cluster's workers says what auto would pick.
        args = [str(model), "--coordinator", coord.address, "--config", str(coord.config)]
        args += ["--objective", "throughput"]
        result = CliRunner().invoke(plan_command, [*args, "--json"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.output)
        assert plan["backend"] == "ring" and "n/a" in plan["backend_reason"]
        nodes = CliRunner().invoke(main, ["nodes", *args[1:5]])
        assert "on 2 nodes over ring" in " ".join(nodes.output.split()), nodes.output
