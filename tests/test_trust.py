"""The cluster secret on every call of a live cluster, and bad input fuzzed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from clusterkit import (
    cluster_config,
    generate_tokens,
    list_nodes,
    local_cluster,
    reference_tokens,
    wait_for,
    wait_serving,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelfactory import make_model

from pomona import rpc
from pomona.local import free_port_pair
from pomona.security import Auth, ClusterSecrets, load_cluster_config
from pomona.tokens import AUTH_METADATA_KEY, sign
from pomona.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    runner_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("trust")
    model = make_model(root / "llama", "llama", num_layers=4, seed=9)
    http_port = free_port_pair(set())
    with local_cluster(root) as c:
        w0 = c.worker("w0")
        c.worker("w1")
        coord = c.coordinator(str(model), min_workers=2, http_port=http_port)
        reply = wait_serving(coord)
        head = next(n for n in reply.nodes if n.shard.start_layer == 0).shard.runner_address
        yield {
            "c": c, "coord": coord, "worker": w0, "head": head, "model": model,
            "http": f"http://127.0.0.1:{http_port}", "root": root,
        }  # fmt: skip


def _calls(info: dict) -> list[tuple[str, str, object]]:
    """(address, method, callable on a channel) for every RPC of every service."""
    w, coord, head = info["worker"].address, info["coord"].address, info["head"]
    gen = common_pb2.GenerateRequest(prompt=PROMPT, max_tokens=2)
    worker_calls = {
        "Describe": worker_pb2.DescribeRequest(),
        "InspectModel": worker_pb2.InspectModelRequest(model="llama"),
        "Load": worker_pb2.LoadRequest(load_id="x", model="llama", end_layer=1, world_size=1,
                                       ring_hosts=["127.0.0.1:1"], workers=["127.0.0.1:1"]),
        "Unload": worker_pb2.UnloadRequest(load_id="x"),
        "WatchShard": worker_pb2.WatchShardRequest(load_id="x"),
        "Wake": worker_pb2.WakeRequest(load_id="x"),
        "Telemetry": worker_pb2.TelemetryRequest(),
        "LinkListen": worker_pb2.LinkListenRequest(host="127.0.0.1"),
        "LinkProbe": worker_pb2.LinkProbeRequest(host="127.0.0.1", port=1, ticket=b"t" * 32,
                                                 bytes=1, timeout_s=1),
    }  # fmt: skip
    out = []
    for name, req in worker_calls.items():
        out.append((w, f"/pomona.v1.Worker/{name}", (worker_pb2_grpc.WorkerStub, name, req)))
    coordinator_calls = {
        "Generate": gen,
        "ListNodes": coordinator_pb2.ListNodesRequest(),
        "Status": coordinator_pb2.StatusRequest(),
        "Events": coordinator_pb2.EventsRequest(),
    }
    for name, req in coordinator_calls.items():
        out.append(
            (
                coord,
                f"/pomona.v1.Coordinator/{name}",
                (coordinator_pb2_grpc.CoordinatorStub, name, req),
            )
        )
    out.append((head, "/pomona.v1.Runner/Generate", (runner_pb2_grpc.RunnerStub, "Generate", gen)))
    return out


def _invoke(channel: grpc.Channel, call: tuple, metadata: tuple = ()) -> None:
    stub_class, name, request = call
    result = getattr(stub_class(channel), name)(request, timeout=10, metadata=metadata)
    if not hasattr(result, "SerializeToString"):  # a stream
        next(iter(result))


@pytest.mark.parametrize("who", ["nobody", "wrong secret", "another cluster"])
def test_every_rpc_of_every_service_refuses_callers_without_the_secret(cluster, who) -> None:
    secrets = load_cluster_config(cluster["coord"].config).secrets
    auth = {
        "nobody": Auth.none(),
        "wrong secret": Auth(ClusterSecrets(secrets.cluster, b"x" * 32)),
        "another cluster": Auth(ClusterSecrets.generate("someone-else")),
    }[who]
    for address, method, call in _calls(cluster):
        with rpc.channel(address, auth) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _invoke(channel, call)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    # The cluster still serves its own.
    model = cluster["model"]
    assert generate_tokens(cluster["coord"], PROMPT, 6)[0] == reference_tokens(model, PROMPT, 6)


def test_a_replayed_call_is_refused(cluster) -> None:
    secrets = load_cluster_config(cluster["coord"].config).secrets
    method = "/pomona.v1.Coordinator/ListNodes"
    token = ((AUTH_METADATA_KEY, sign(secrets, method)),)
    call = (coordinator_pb2_grpc.CoordinatorStub, "ListNodes", coordinator_pb2.ListNodesRequest())
    with rpc.channel(cluster["coord"].address) as channel:
        _invoke(channel, call, token)  # the first use passes
        with pytest.raises(grpc.RpcError) as info:
            _invoke(channel, call, token)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replay" in info.value.details()


def test_a_coordinator_of_another_cluster_cannot_use_our_workers(cluster) -> None:
    c = cluster["c"]
    # A coordinator holding the configuration of cluster "intruders", told
    # where our worker is.
    path = cluster_config(cluster["root"], "intruders")
    intruder = c._spawn(
        "intruder",
        ["coordinator", "--port", str(free_port_pair(c.taken)), "--host", "127.0.0.1",
         "--model", str(cluster["model"]), "--worker", cluster["worker"].address,
         "--mdns-interface", "127.0.0.1", "--http-port", "0",
         "--state-dir", str(cluster["root"] / "intruder")],
        0, path,
    )  # fmt: skip
    wait_for(lambda: "refused" in intruder.tail(), 30, "the worker's refusal")
    assert intruder.alive()
    # Our cluster still serves, and our worker still holds our shard.
    assert list_nodes(cluster["coord"]).serving
    intruder.stop()


def test_worker_without_a_configuration_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_STATE_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pomona", "worker", "--port", "0"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no cluster configuration" in result.stderr and "pomona init" in result.stderr


_text = st.text(max_size=300)
_ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def generate_requests(draw: st.DrawFn) -> common_pb2.GenerateRequest:
    request = common_pb2.GenerateRequest(
        request_id=draw(st.text(max_size=200)),
        prompt=draw(_text),
        prompt_tokens=draw(st.lists(_ints, max_size=20)),
        max_tokens=draw(st.one_of(st.integers(-5, 12), _ints)),
        stop=draw(st.lists(_text, max_size=10)),
        fit_max_tokens=draw(st.booleans()),
    )
    for _ in range(draw(st.integers(0, 3))):
        request.messages.add(role=draw(st.sampled_from(["user", "system", "bad", ""])),
                             content=draw(_text))  # fmt: skip
    s = request.sampling
    s.temperature, s.top_p, s.min_p = draw(_floats), draw(_floats), draw(_floats)
    s.top_k = draw(_ints)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return request


OK_OR_REFUSED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=generate_requests())
def test_fuzzed_grpc_requests_get_an_answer_or_a_clear_refusal(cluster, request) -> None:
    request.max_tokens = min(request.max_tokens, 8)  # keep the good ones short
    channel = rpc.channel(cluster["coord"].address, cluster["coord"].auth)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    try:
        for _ in stub.Generate(request, timeout=60):
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert e.details(), code
    finally:
        channel.close()
    assert code in OK_OR_REFUSED, code


_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "x"]), "content": st.text(max_size=50)}
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["llama", "x", ""]) | _json,
        "prompt": st.text(max_size=100) | _json,
        "messages": st.lists(_message, max_size=3) | _json,
        "max_tokens": st.integers(-3, 8) | _json,
        "temperature": _json,
        "top_p": _json,
        "stop": _json,
        "n": _json,
        "stream": st.booleans(),
        "seed": _json,
    },
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_fields, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_http_requests_never_get_a_server_error(cluster, body, path) -> None:
    request = urllib.request.Request(
        cluster["http"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status = reply.status
            reply.read()
    except urllib.error.HTTPError as e:
        status = e.code
        assert json.loads(e.read())["error"]["message"]
    assert status < 500 or status == 503, (status, body)


def test_after_the_fuzzing_the_cluster_still_gives_the_right_tokens(cluster) -> None:
    model = cluster["model"]
    assert generate_tokens(cluster["coord"], PROMPT, 10)[0] == reference_tokens(model, PROMPT, 10)
    assert all(p.alive() for p in cluster["c"].procs if p.name != "intruder")
