"""A cluster whose every gRPC call runs over mutual TLS, from `pomona init --tls`."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from clusterkit import generate_tokens, local_cluster, reference_tokens, wait_serving
from modelfactory import make_model

from pomona import rpc
from pomona.init_cmd import init_command
from pomona.security import Auth, load_cluster_config
from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


def test_a_cluster_runs_over_mutual_tls_and_refuses_plaintext(tmp_path: Path) -> None:
    made = tmp_path / "made" / "cluster.json"
    result = CliRunner().invoke(
        init_command,
        ["--cluster", "tlslab", "--tls", "--hosts", "127.0.0.1", "--config", str(made)],
    )
    assert result.exit_code == 0, result.output
    config = made.parent / "hosts" / "127.0.0.1" / "pomona" / "cluster.json"
    assert load_cluster_config(config).secrets.tls
    model = make_model(tmp_path / "llama", "llama", num_layers=4, seed=4)
    with local_cluster(tmp_path, "tlslab") as c:
        c.worker("w0", config=config)
        c.worker("w1", config=config)
        coord = c.coordinator(str(model), min_workers=2, config=config)
        wait_serving(coord)
        assert generate_tokens(coord, PROMPT, 8)[0] == reference_tokens(model, PROMPT, 8)
        # The right secret over plaintext is not enough.
        secrets = load_cluster_config(config).secrets
        plain = Auth(type(secrets)(secrets.cluster, secrets.secret))
        with rpc.channel(coord.address, plain) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
