"""Monitoring a real local cluster: status, events, /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from clusterkit import describe, generate_tokens, local_cluster, wait_for, wait_serving
from modelfactory import make_model
from prometheus_client.parser import text_string_to_metric_families

from pomona.local import free_port_pair

pytestmark = pytest.mark.cluster

HEARTBEAT = 3.0


def pomona(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", "pomona", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def status_json(coord) -> dict:
    result = pomona("status", "--json", "--coordinator", coord.address, config=coord.config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_events_and_metrics_of_a_live_cluster(tmp_path: Path) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    http = free_port_pair(set())
    with local_cluster(tmp_path) as c:
        c.worker("w0")
        w1 = c.worker("w1")
        coord = c.coordinator(
            str(model), min_workers=2, http_port=http,
            extra=("--heartbeat-timeout", str(HEARTBEAT)),
        )  # fmt: skip
        wait_serving(coord)
        generate_tokens(coord, "The lab has", 8)
        # Every node with real memory figures: the runner's resident memory as
        # psutil sees that very process.
        data = wait_for(
            lambda: (
                (d := status_json(coord))
                and all("runner" in n.get("sample", {}) for n in d["nodes"])
                and d
            ),
            30,
            "samples with runner stats",
        )
        assert data["schema"] == "pomona.status/v1" and data["serving"]
        assert len(data["nodes"]) == 2
        for node in data["nodes"]:
            sample, shard = node["sample"], node["node"]["shard"]
            assert int(sample["memory_total_bytes"]) == psutil.virtual_memory().total
            rss = psutil.Process(int(shard["runner_pid"])).memory_info().rss
            assert abs(int(sample["runner"]["rss_bytes"]) - rss) < 0.25 * rss
            assert int(sample["runner"]["mlx_active_bytes"]) > 0
            assert "gpu_power_watts" not in sample  # n/a on this machine, never 0
            # Only the head runner counts tokens; every stage shows the pipeline's rate.
            assert node["pipeline_tokens_per_s"] == data["tokens_per_s"]

        # The table fits 80 columns.
        table = pomona("status", "--coordinator", coord.address, config=coord.config)
        assert table.returncode == 0, table.stderr
        assert max(len(line) for line in table.stdout.splitlines()) <= 80
        assert "w0" in table.stdout and "w1" in table.stdout

        # /metrics parses and agrees with --json.
        text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10).read()
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        assert families["pomona_cluster_serving"].samples[0].value == 1
        used = {
            s.labels["node"]: s.value for s in families["pomona_node_memory_total_bytes"].samples
        }
        assert set(used) == {n["node"]["name"] for n in data["nodes"]}

        # A worker killed with SIGKILL is lost within the heartbeat timeout.
        node_id = describe(w1).node_id
        os.killpg(w1.popen.pid, signal.SIGKILL)
        wait_for(
            lambda: any(
                n["node"]["node_id"] == node_id and n["node"]["state"] == "NODE_STATE_LOST"
                for n in status_json(coord)["nodes"]
            ),
            HEARTBEAT + 5,
            "the node to show as lost",
        )

        def kinds() -> list[str]:
            out = pomona("events", "--json", "--coordinator", coord.address, config=coord.config)
            return [json.loads(line)["kind"] for line in out.stdout.splitlines()]

        wait_for(lambda: "node_lost" in kinds(), 5, "the node_lost event")
        assert "pipeline_failed" in kinds()
        # Its last figures are stale: none are shown.
        (lost,) = [n for n in status_json(coord)["nodes"] if n["node"]["node_id"] == node_id]
        assert "sample" not in lost and "shard" not in lost["node"], lost
        table = pomona("status", "--coordinator", coord.address, config=coord.config).stdout
        (row,) = [line for line in table.splitlines() if line.startswith("w1 ")]
        assert row.split()[1:] == ["lost", "-", "n/a", "n/a", "n/a", "n/a", "-", "n/a"], table

        # Restarted, it returns under the same id.
        again = c.worker("w1", port=w1.port)
        wait_for(lambda: describe(again).node_id == node_id, 30, "the worker to restart")
        wait_for(
            lambda: any(
                n["node"]["node_id"] == node_id and n["node"]["state"] != "NODE_STATE_LOST"
                for n in status_json(coord)["nodes"]
            ),
            30,
            "the node to return",
        )
        events = pomona("events", "--json", "--coordinator", coord.address, config=coord.config)
        returned = [json.loads(line) for line in events.stdout.splitlines()]
        assert any(e["kind"] == "node_returned" and e["node_id"] == node_id for e in returned)
        assert len(status_json(coord)["nodes"]) == 2


def event_node_names(coord) -> set[str]:  # type: ignore[no-untyped-def]
    out = pomona("events", "--json", "--coordinator", coord.address, config=coord.config)
    return {json.loads(line)["node_name"] for line in out.stdout.splitlines()}


def test_events_show_only_the_history_of_this_coordinators_cluster(tmp_path: Path) -> None:
    """`pomona up --local` names a new cluster each time, with one state directory."""
    model = make_model(tmp_path / "llama", "llama", num_layers=4)
    seen: dict[str, set[str]] = {}
    for run in ("first", "second"):
        with local_cluster(tmp_path, f"local-{run}") as c:
            worker = c.worker(f"{run}-w").name.removeprefix("worker-")
            # Two workers wanted, one started: the coordinator never plans.
            coord = c.coordinator(str(model), min_workers=2)
            seen[run] = wait_for(
                lambda w=worker, c=coord: w in (names := event_node_names(c)) and names,
                60,
                "node_joined",
            )
    assert seen["second"] == {"second-w"}, seen
