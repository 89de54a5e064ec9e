"""The planner's weight figures against what runners really hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from clusterkit import local_cluster, wait_for, wait_serving
from modelfactory import make_model

from pomona.coordinator.plan_cli import _load_nodes_from_coordinator
from pomona.model_profile import ModelProfile

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_runner_memory_after_loading_is_within_15_percent_of_the_plan(
    tmp_path: Path, arch: str
) -> None:
    overrides = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8}
    model = make_model(tmp_path / arch, arch, num_layers=6, shards=3, overrides=overrides)
    profile = ModelProfile.from_model_dir(model)
    with local_cluster(tmp_path) as c:
        for i in range(3):
            c.worker(f"w{i}")
        coord = c.coordinator(str(model), min_workers=3)
        reply = wait_serving(coord)
        # The coordinator's workers, as `pomona plan --coordinator` sees them.
        nodes, facts, links = _load_nodes_from_coordinator(coord.address, coord.config)
        assert len(nodes) == 3 and len(facts) == 3
        if arch == "llama":
            # Every pair of workers is measured: on loopback (one address each, nothing
            # to choose) some seconds after the pipeline serves, so that neither the
            # plan nor the first requests wait for the probes.
            assert not links
            links = wait_for(
                lambda: (
                    len(ls := _load_nodes_from_coordinator(coord.address, coord.config)[2]) == 3
                    and ls
                ),
                60,
                "the links to be measured",
            )
            assert all(link.bandwidth_gbs > 0 for link in links)
    stages = sorted(reply.nodes, key=lambda n: n.shard.start_layer)
    for i, node in enumerate(stages):
        s = node.shard
        planned = sum(profile.layer_weight_bytes[s.start_layer : s.end_layer])
        if i == 0:
            planned += profile.embedding_bytes
        if i == len(stages) - 1:
            planned += profile.head_bytes + (
                profile.embedding_bytes if profile.tied_embeddings else 0
            )
        assert s.active_bytes > 0
        assert abs(s.active_bytes - planned) <= 0.15 * planned, (node.name, s.active_bytes, planned)
