"""Trust both ways on a live cluster: workers prove the secret, tokens name their server
and request, a replayed Wake is ignored, the head runner's port is fixed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from clusterkit import (
    describe,
    generate_tokens,
    list_nodes,
    local_cluster,
    reference_tokens,
    wait_for,
    wait_serving,
    worker_stub,
)
from modelfactory import make_model
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from pomona import rpc
from pomona.config import PROTOCOL_VERSION, SERVICE_TYPE
from pomona.coordinator.events import events_path
from pomona.local import free_worker_ports
from pomona.security import load_cluster_config
from pomona.tokens import AUTH_METADATA_KEY, WRONG_BODY, WRONG_TARGET, sign
from pomona.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


class RogueWorker(worker_pb2_grpc.WorkerServicer):
    """A worker without the secret that answers every call plausibly, and remembers them."""

    def __init__(self, cluster: str, port: int) -> None:
        self.cluster = cluster
        self.port = port
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def _note(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    def _shard(self, state: int = worker_pb2.SHARD_STATE_EMPTY) -> worker_pb2.ShardStatus:
        return worker_pb2.ShardStatus(state=state, runner_address=f"127.0.0.1:{self.port + 2}")

    def Describe(self, request: Any, context: Any) -> worker_pb2.DescribeReply:  # noqa: N802
        self._note("Describe")
        return worker_pb2.DescribeReply(
            node_id="r0gue0000000",
            name="big-studio",
            cluster=self.cluster,
            protocol_version=PROTOCOL_VERSION,
            hardware=worker_pb2.Hardware(
                hostname="big-studio",
                os="macOS 15.4",
                chip="Apple M3 Ultra",
                machine_model="Mac15,14",
                cpu_cores=32,
                gpu_cores=80,
                total_memory_bytes=512 << 30,
                available_memory_bytes=500 << 30,
                gpu_memory_limit_bytes=480 << 30,
            ),
            mlx_version="0.32.4",
            backends=["ring"],
            ring_port=self.port + 1,
            shard=self._shard(),
            proof="0" * 64,
        )

    def InspectModel(self, request: Any, context: Any) -> worker_pb2.ModelInfo:  # noqa: N802
        self._note("InspectModel")
        return worker_pb2.ModelInfo(model=request.model, num_layers=4, layer_bytes=[1] * 4)

    def Load(self, request: Any, context: Any) -> worker_pb2.ShardStatus:  # noqa: N802
        self._note("Load")
        return self._shard(worker_pb2.SHARD_STATE_STARTING)

    def Unload(self, request: Any, context: Any) -> worker_pb2.ShardStatus:  # noqa: N802
        self._note("Unload")
        return self._shard(worker_pb2.SHARD_STATE_STOPPED)

    def WatchShard(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._note("WatchShard")
        yield self._shard(worker_pb2.SHARD_STATE_READY)

    def Wake(self, request: Any, context: Any) -> worker_pb2.WakeReply:  # noqa: N802
        self._note("Wake")
        return worker_pb2.WakeReply()

    def Telemetry(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._note("Telemetry")
        while context.is_active():
            yield worker_pb2.NodeSample(node_id="r0gue0000000")
            time.sleep(1.0)


def test_a_rogue_worker_without_the_secret_is_never_admitted(tmp_path: Path) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4, seed=12)
    with local_cluster(tmp_path) as c:
        port = free_worker_ports(c.taken)
        rogue = RogueWorker(c.cluster, port)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_pb2_grpc.add_WorkerServicer_to_server(rogue, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        # It advertises itself over Bonjour as a worker of this cluster, too.
        props = {"node_id": "r0gue0000000", "protocol": str(PROTOCOL_VERSION),
                 "cluster": c.cluster, "name": "big-studio", "grpc_port": str(port),
                 "memory": str(512 << 30), "chip": "Apple M3 Ultra"}  # fmt: skip
        advert = ServiceInfo(
            SERVICE_TYPE, f"big-studio.{SERVICE_TYPE}", addresses=[socket.inet_aton("127.0.0.1")],
            port=port, properties=props, server="big-studio.local.",
        )  # fmt: skip
        zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        zc.register_service(advert)
        try:
            c.worker("w0")
            # Default settings (no TLS), the objective that would give it the whole model.
            coord = c.coordinator(
                str(model), extra=("--objective", "latency", "--worker", f"127.0.0.1:{port}")
            )
            reply = wait_serving(coord)
            wait_for(lambda: rogue.calls, 30, "the coordinator to call the rogue")
            wait_for(lambda: f"at 127.0.0.1:{port}" in coord.tail(200), 30, "its verdict")
            assert [n.name for n in reply.nodes] == ["w0"]
            assert [n.name for n in list_nodes(coord).nodes] == ["w0"]
            with rogue.lock:
                assert set(rogue.calls) == {"Describe"}, rogue.calls
            events = events_path(tmp_path / "coordinator", c.cluster).read_text().splitlines()
            joined = [json.loads(e) for e in events if "node_joined" in e]
            assert [e.get("node_name") for e in joined] == ["w0"], joined
            tokens = generate_tokens(coord, PROMPT, 6)[0]
            assert tokens == reference_tokens(model, PROMPT, 6)
            assert f"big-studio at 127.0.0.1:{port}: no proof of the cluster secret" in coord.tail(
                200
            )
            with rogue.lock:
                assert set(rogue.calls) == {"Describe"}, rogue.calls
        finally:
            zc.unregister_service(advert)
            zc.close()
            server.stop(None)


def test_a_token_for_one_worker_is_refused_by_another_and_with_another_body(
    tmp_path: Path,
) -> None:
    with local_cluster(tmp_path) as c:
        a, b = c.worker("a"), c.worker("b")
        secrets = load_cluster_config(a.config).secrets if a.config else None
        assert secrets is not None
        node_a = wait_for(lambda: describe(a).node_id, 60, "worker a")
        wait_for(lambda: describe(b).node_id, 60, "worker b")
        method = "/pomona.v1.Worker/Unload"
        request = worker_pb2.UnloadRequest(load_id="x")
        captured = sign(secrets, method, target=node_a, body=request.SerializeToString())

        def unload(worker: Any, req: worker_pb2.UnloadRequest, token: str) -> Any:
            with rpc.channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                return stub.Unload(req, timeout=5, metadata=[(AUTH_METADATA_KEY, token)])

        with pytest.raises(grpc.RpcError) as info:
            unload(b, request, captured)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == WRONG_TARGET
        with pytest.raises(grpc.RpcError) as info:
            unload(a, worker_pb2.UnloadRequest(load_id="y"), captured)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == WRONG_BODY
        # The same call, freshly signed for a and this body, passes.
        fresh = sign(secrets, method, target=node_a, body=request.SerializeToString())
        assert unload(a, request, fresh).state == worker_pb2.SHARD_STATE_STOPPED


def _cpu_seconds(pid: int, seconds: float) -> float:
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)  # the quantity measured is CPU over a span of time
    after = process.cpu_times()
    return (after.user + after.system) - (before.user + before.system)


def test_a_replayed_wake_leaves_the_follower_idle_and_the_head_port_is_fixed(
    tmp_path: Path,
) -> None:
    model = make_model(tmp_path / "llama", "llama", num_layers=4, seed=13)
    with local_cluster(tmp_path) as c:
        # Each worker's head runner port, chosen (--runner-port) and not gRPC port + 2.
        runner_ports = {name: free_worker_ports(c.taken) for name in ("w0", "w1")}
        workers = {
            name: c.worker(name, extra=("--runner-port", str(port)))
            for name, port in runner_ports.items()
        }
        coord = c.coordinator(str(model), min_workers=2, layers="2,2")
        reply = wait_serving(coord)
        head = next(n for n in reply.nodes if n.shard.start_layer == 0)
        head_port = runner_ports[head.name]
        assert head.shard.runner_address == f"127.0.0.1:{head_port}"
        assert generate_tokens(coord, PROMPT, 6)[0] == reference_tokens(model, PROMPT, 6)

        w1 = next(w for name, w in workers.items() if name != head.name)
        shard = describe(w1).shard
        assert shard.rank == 1 and shard.state == worker_pb2.SHARD_STATE_READY
        idle = _cpu_seconds(shard.runner_pid, 2.0)
        # The Wake of the session that just ran, again, and one without a session.
        stub = worker_stub(w1)
        for session in (1, 1, 0):
            stub.Wake(worker_pb2.WakeRequest(load_id=shard.load_id, session=session), timeout=5)
        busy = _cpu_seconds(shard.runner_pid, 3.0)
        assert busy < 0.3, (idle, busy)
        assert generate_tokens(coord, PROMPT, 6)[0] == reference_tokens(model, PROMPT, 6)

        # A re-formed pipeline serves on the same port. (Only the coordinator
        # holding the workers' lease may unload them: kill the head runner.)
        os.kill(head.shard.runner_pid, signal.SIGKILL)

        def reformed() -> Any:
            nodes = list_nodes(coord)
            heads = [n for n in nodes.nodes if n.shard.start_layer == 0 and n.shard.load_id]
            if nodes.serving and heads and heads[0].shard.load_id != shard.load_id:
                return heads[0]
            return None

        again = wait_for(reformed, 120, "the pipeline to re-form")
        assert again.shard.runner_address == f"127.0.0.1:{head_port}"


LOOPBACK_ONLY = {"127.0.0.1"}
EVERY_INTERFACE = {"0.0.0.0", "::"}


def _listening_host(pid: int, port: int) -> str:
    def find() -> str:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                return str(conn.laddr.ip)
        return ""

    return wait_for(find, 60, f"a listener on port {port}")


def test_the_http_api_listens_on_loopback_only_unless_it_has_a_key(tmp_path: Path) -> None:
    key = tmp_path / "api-key"
    key.write_text("k" * 32)
    cases = {
        (): LOOPBACK_ONLY,
        ("--insecure-http",): EVERY_INTERFACE,
        ("--api-key-file", str(key)): EVERY_INTERFACE,
    }
    with local_cluster(tmp_path) as c:
        started = []
        for extra in cases:
            http = free_worker_ports(c.taken)
            args = ("--host", "0.0.0.0", "--state-dir", str(tmp_path / f"c{http}"), *extra)
            started.append((c.coordinator("pomona-demo", http_port=http, extra=args), http))
        for (proc, http), expected in zip(started, cases.values(), strict=True):
            assert _listening_host(proc.popen.pid, http) in expected, proc.tail()
            assert _listening_host(proc.popen.pid, proc.port) in EVERY_INTERFACE  # gRPC: --host
        assert "pass --insecure-http" in started[0][0].tail(200)


def test_clients_of_a_local_cluster_use_its_credentials_after_pomona_init(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path))
    pomona = [sys.executable, "-m", "pomona"]
    made = subprocess.run([*pomona, "init", "--cluster", "lab"], env=env, capture_output=True)
    assert made.returncode == 0, made.stderr
    port = free_worker_ports(set())
    up = subprocess.Popen(
        [*pomona, "up", "--local", "1", "--port", str(port), "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert line.startswith("Pomona is up"), line + (up.stderr.read() if up.stderr else "")
        address = f"127.0.0.1:{port}"
        nodes = subprocess.run(
            [*pomona, "nodes", "--coordinator", address, "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert nodes.returncode == 0, nodes.stderr
        assert "local-1" in nodes.stdout
        # Told to use the lab's configuration, it is refused and told what to pass.
        lab = tmp_path / ".config" / "pomona" / "cluster.json"
        refused = subprocess.run(
            [*pomona, "nodes", "--coordinator", address, "--config", str(lab)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "credentials of cluster 'lab'" in refused.stderr
        assert "pass --config" in refused.stderr
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)
