"""Cluster credentials on every call, TLS, and the configuration file, with real servers.

Each server (sync ``grpc.server`` as in the head runner, ``grpc.aio`` as in the worker
and coordinator) hosts the standard health service and a small test service with a
unary, a server-streaming and a client-streaming method (generic handlers, raw bytes).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pomona import rpc
from pomona.init_cmd import init_command
from pomona.security import (
    Auth,
    ClusterConfig,
    ClusterConfigError,
    ClusterSecrets,
    default_config_path,
    load_cluster_config,
    save_cluster_config,
)
from pomona.tokens import (
    AUTH_METADATA_KEY,
    MALFORMED,
    MISSING,
    REPLAYED,
    WRONG_BODY,
    WRONG_SECRET,
    WRONG_TARGET,
    Verifier,
    is_target,
    sign,
)

SAY = "/pomona.test.Echo/Say"
COUNT = "/pomona.test.Echo/Count"
SUM = "/pomona.test.Echo/Sum"
PARSE = "/pomona.test.Echo/Parse"
SECRETS = ClusterSecrets.generate("lab")
# Requests the test service's Parse method deserialized: none may come from a refused call.
PARSED: list[bytes] = []


def _parse(data: bytes) -> bytes:
    PARSED.append(data)
    return data


TIMEOUT = 5.0


def _sync_handler() -> grpc.GenericRpcHandler:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"hi " + request

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from (bytes([i]) for i in range(3))

    def total(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return bytes([sum(len(r) for r in requests)])

    return grpc.method_handlers_generic_handler(
        "pomona.test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Sum": grpc.stream_unary_rpc_method_handler(total),
            "Parse": grpc.unary_unary_rpc_method_handler(say, request_deserializer=_parse),
        },
    )


def _aio_handler() -> grpc.GenericRpcHandler:
    async def say(request: bytes, context: Any) -> bytes:
        return b"hi " + request

    async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    async def total(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return bytes([sum([len(r) async for r in requests])])

    return grpc.method_handlers_generic_handler(
        "pomona.test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Sum": grpc.stream_unary_rpc_method_handler(total),
            "Parse": grpc.unary_unary_rpc_method_handler(say, request_deserializer=_parse),
        },
    )


class SyncServer:
    def __init__(self, auth: Auth, target: str = "") -> None:
        self.server = rpc.server(futures.ThreadPoolExecutor(max_workers=4), auth, target)
        self.server.add_generic_rpc_handlers((_sync_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        self.address = f"127.0.0.1:{rpc.add_port(self.server, '127.0.0.1:0', auth)}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


class AioServer:
    """A grpc.aio server on an event loop of its own thread, so sync clients can call it."""

    def __init__(self, auth: Auth, target: str = "") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = self._start(auth, target)
        port = asyncio.run_coroutine_threadsafe(start, self.loop).result(TIMEOUT)
        self.address = f"127.0.0.1:{port}"

    async def _start(self, auth: Auth, target: str) -> int:
        self.server = rpc.aio_server(auth, target)
        self.server.add_generic_rpc_handlers((_aio_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), self.server)
        port = rpc.add_port(self.server, "127.0.0.1:0", auth)
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def _start(kind: str, auth: Auth, target: str = "") -> SyncServer | AioServer:
    return SyncServer(auth, target) if kind == "sync" else AioServer(auth, target)


@pytest.fixture(params=["sync", "aio"])
def server(request: pytest.FixtureRequest) -> Iterator[SyncServer | AioServer]:
    srv = _start(request.param, Auth(SECRETS))
    yield srv
    srv.stop()


def _say(ch: grpc.Channel, metadata: Any = None) -> bytes:
    return ch.unary_unary(SAY)(b"there", timeout=TIMEOUT, metadata=metadata)  # type: ignore[no-any-return]


def _count(ch: grpc.Channel, metadata: Any = None) -> list[bytes]:
    return list(ch.unary_stream(COUNT)(b"", timeout=TIMEOUT, metadata=metadata))


def _sum(ch: grpc.Channel) -> bytes:
    return ch.stream_unary(SUM)(iter([b"ab", b"c"]), timeout=TIMEOUT)  # type: ignore[no-any-return]


def _refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return info.value


def test_right_credentials_pass_on_unary_and_streaming_calls(server: Any) -> None:
    with rpc.channel(server.address, Auth(SECRETS)) as ch:
        assert _say(ch) == b"hi there"
        assert _count(ch) == [b"\x00", b"\x01", b"\x02"]
        assert _sum(ch) == b"\x03"


@pytest.mark.parametrize("call", [_say, _count, _sum])
def test_calls_without_credentials_are_refused(server: Any, call: Any) -> None:
    with rpc.channel(server.address) as ch:
        err = _refusal(lambda: call(ch))
    assert err.details() == MISSING
    assert "pomona init" in MISSING


def test_refused_requests_are_never_parsed(server: Any) -> None:
    PARSED.clear()
    with rpc.channel(server.address) as ch:
        _refusal(lambda: ch.unary_unary(PARSE)(b"\xff\xfe", timeout=TIMEOUT))
    assert PARSED == []
    with rpc.channel(server.address, Auth(SECRETS)) as ch:
        assert ch.unary_unary(PARSE)(b"ok", timeout=TIMEOUT) == b"hi ok"
    assert PARSED == [b"ok"]


@pytest.mark.parametrize("call", [_say, _count, _sum])
def test_wrong_secret_is_refused(server: Any, call: Any) -> None:
    wrong = ClusterSecrets("lab", bytes(32))
    with rpc.channel(server.address, Auth(wrong)) as ch:
        assert _refusal(lambda: call(ch)).details() == WRONG_SECRET


@pytest.mark.parametrize("call", [_say, _count])
def test_credentials_of_another_cluster_are_refused(server: Any, call: Any) -> None:
    with rpc.channel(server.address, Auth(ClusterSecrets.generate("other"))) as ch:
        err = _refusal(lambda: call(ch))
    assert err.details() == "credentials of cluster 'other', this is cluster 'lab'"


@pytest.mark.parametrize("call", [_say, _count])
def test_replayed_metadata_is_refused(server: Any, call: Any) -> None:
    method, body = (SAY, b"there") if call is _say else (COUNT, b"")
    metadata = [(AUTH_METADATA_KEY, sign(SECRETS, method, body=body))]
    with rpc.channel(server.address) as ch:
        call(ch, metadata)
        assert _refusal(lambda: call(ch, metadata)).details() == REPLAYED


def test_credentials_replayed_from_another_cluster_are_refused(server: Any) -> None:
    other = ClusterSecrets.generate("other")
    metadata = [(AUTH_METADATA_KEY, sign(other, SAY))]
    with rpc.channel(server.address) as ch:
        err = _refusal(lambda: _say(ch, metadata))
    assert "credentials of cluster 'other'" in err.details()


def test_credentials_for_another_method_are_refused(server: Any) -> None:
    metadata = [(AUTH_METADATA_KEY, sign(SECRETS, COUNT))]
    with rpc.channel(server.address) as ch:
        assert _refusal(lambda: _say(ch, metadata)).details() == WRONG_SECRET


@pytest.mark.parametrize("seconds", [-301, 301])
def test_stale_timestamps_are_refused(server: Any, seconds: int) -> None:
    unix_ms = int((time.time() + seconds) * 1000)
    metadata = [(AUTH_METADATA_KEY, sign(SECRETS, SAY, unix_ms=unix_ms))]
    with rpc.channel(server.address) as ch:
        err = _refusal(lambda: _say(ch, metadata))
    assert err.details().startswith("stale credentials: the caller's clock is")
    assert "network time" in err.details()


@pytest.mark.parametrize(
    "value",
    ["", "v2", "v2.lab.1.2.3", "garbage", "v2.lab.x.y.z.w", "v2." + "a" * 600, "v2.l@b.1.2.3"],
)
def test_malformed_credentials_are_refused(server: Any, value: str) -> None:
    with rpc.channel(server.address) as ch:
        assert _refusal(lambda: _say(ch, [(AUTH_METADATA_KEY, value)])).details() == MALFORMED


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_token_is_refused_by_a_server_it_was_not_signed_for(kind: str) -> None:
    a, b = _start(kind, Auth(SECRETS), "node-a"), _start(kind, Auth(SECRETS), "node-b")
    try:
        token = sign(SECRETS, SAY, target="node-a", body=b"there")
        with rpc.channel(b.address) as ch:
            err = _refusal(lambda: _say(ch, [(AUTH_METADATA_KEY, token)]))
        assert err.details() == WRONG_TARGET
        with rpc.channel(a.address) as ch:
            assert _say(ch, [(AUTH_METADATA_KEY, token)]) == b"hi there"
        for channel_target in ("node-b", ""):  # a channel for another node, or for none
            with rpc.channel(a.address, Auth(SECRETS), channel_target) as ch:
                assert _refusal(lambda: _say(ch)).details() == WRONG_TARGET
        with rpc.channel(a.address, Auth(SECRETS), "node-a") as ch:
            assert _count(ch) == [b"\x00", b"\x01", b"\x02"]
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_token_is_refused_with_another_body_which_is_never_parsed(kind: str) -> None:
    srv = _start(kind, Auth(SECRETS))
    PARSED.clear()
    try:
        token = sign(SECRETS, PARSE, body=b"load model a")
        with rpc.channel(srv.address) as ch:
            call = ch.unary_unary(PARSE)
            err = _refusal(
                lambda: call(
                    b"load model b", timeout=TIMEOUT, metadata=[(AUTH_METADATA_KEY, token)]
                )
            )
            assert err.details() == WRONG_BODY
            assert PARSED == []
            other = [(AUTH_METADATA_KEY, sign(SECRETS, COUNT, body=b"x"))]
            assert _refusal(lambda: _count(ch, other)).details() == WRONG_BODY
            right = [(AUTH_METADATA_KEY, sign(SECRETS, COUNT, body=b""))]
            assert _count(ch, right) == [b"\x00", b"\x01", b"\x02"]
    finally:
        srv.stop()


def test_servers_are_named_by_ids_without_dots() -> None:
    assert is_target("1b4d31589c24") and is_target("1b4d31589c24/9f2e0c1a7b3d")
    assert is_target("")  # the coordinator
    assert not is_target("a.b") and not is_target("a|b") and not is_target("x" * 161)
    with pytest.raises(ValueError):
        sign(SECRETS, SAY, target="a.b")


def test_only_describe_may_be_signed_without_naming_its_server() -> None:
    verifier = Verifier(SECRETS, target="node-a")
    describe = "/pomona.v1.Worker/Describe"
    assert verifier.check(describe, [(AUTH_METADATA_KEY, sign(SECRETS, describe))]) is None
    load = "/pomona.v1.Worker/Load"
    assert verifier.check(load, [(AUTH_METADATA_KEY, sign(SECRETS, load))]) == WRONG_TARGET
    signed = sign(SECRETS, load, target="node-a")
    assert verifier.check(load, [(AUTH_METADATA_KEY, signed)]) is None


def test_health_is_exempt(server: Any) -> None:
    with rpc.channel(server.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_refusals_are_logged_with_method_and_peer_but_no_secret(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pomona.rpc")
    wrong = ClusterSecrets("lab", b"\x01" * 32)
    with rpc.channel(server.address, Auth(wrong)) as ch:
        _refusal(lambda: _say(ch))
    lines = [r.getMessage() for r in caplog.records if r.name == "pomona.rpc"]
    assert any(SAY in line and "127.0.0.1" in line and WRONG_SECRET in line for line in lines)
    for secret in (SECRETS.secret, wrong.secret):
        assert all(base64.b64encode(secret).decode() not in line for line in lines)
        assert all(secret.hex() not in line for line in lines)


def test_aio_channels_sign_unary_and_streaming_calls(server: Any) -> None:
    async def calls(auth: Auth) -> tuple[bytes, list[bytes], bytes]:
        async with rpc.aio_channel(server.address, auth) as ch:
            said = await ch.unary_unary(SAY)(b"there", timeout=TIMEOUT)
            counted = [m async for m in ch.unary_stream(COUNT)(b"", timeout=TIMEOUT)]
            summed = await ch.stream_unary(SUM)(iter([b"ab", b"c"]), timeout=TIMEOUT)
        return said, counted, summed

    expected = (b"hi there", [b"\x00", b"\x01", b"\x02"], b"\x03")
    assert asyncio.run(calls(Auth(SECRETS))) == expected
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(calls(Auth(ClusterSecrets("lab", bytes(32)))))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == WRONG_SECRET


def test_auth_none_servers_accept_any_call() -> None:
    srv = _start("aio", Auth.none())
    try:
        with rpc.channel(srv.address) as ch:
            assert _say(ch) == b"hi there"
    finally:
        srv.stop()


def test_describe_error_names_the_refusal_in_one_line(server: Any) -> None:
    with rpc.channel(server.address) as ch:
        err = _refusal(lambda: _say(ch))
    line = rpc.describe_error(err, server.address)
    assert line.startswith(f"{server.address} refused this machine's cluster credentials:")
    assert "\n" not in line


# --- The verifier on its own ----------------------------------------------------------


def test_nonces_are_forgotten_after_the_window_and_the_cache_stays_bounded() -> None:
    now = [1_000_000.0]
    verifier = Verifier(SECRETS, clock=lambda: now[0], cache_size=8)
    token = sign(SECRETS, SAY, unix_ms=int(now[0] * 1000))
    meta = [(AUTH_METADATA_KEY, token)]
    assert verifier.check(SAY, meta) is None
    assert verifier.check(SAY, meta) == REPLAYED
    for _ in range(100):
        fresh = sign(SECRETS, SAY, unix_ms=int(now[0] * 1000))
        assert verifier.check(SAY, [(AUTH_METADATA_KEY, fresh)]) is None
    assert verifier.remembered <= 8
    now[0] += 301
    assert verifier.check(SAY, meta) is not None  # stale now, never accepted again


def test_cluster_names_with_dots_sign_and_verify() -> None:
    dotted = ClusterSecrets.generate("cs.lab-2")
    assert Verifier(dotted).check(SAY, [(AUTH_METADATA_KEY, sign(dotted, SAY))]) is None
    assert Verifier(SECRETS).check(SAY, [(AUTH_METADATA_KEY, sign(dotted, SAY))]) == (
        "credentials of cluster 'cs.lab-2', this is cluster 'lab'"
    )


def test_the_exempt_set_is_only_health() -> None:
    verifier = Verifier(SECRETS)
    assert verifier.check("/grpc.health.v1.Health/Check", []) is None
    assert verifier.check("/grpc.health.v1.Health/Watch", None) is None
    assert verifier.check("/grpc.health.v1.HealthX/Check", []) == MISSING
    assert verifier.check("/pomona.v1.Worker/Load", []) == MISSING


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_config(tmp_path_factory: pytest.TempPathFactory) -> ClusterConfig:
    path = tmp_path_factory.mktemp("tls") / "cluster.json"
    result = CliRunner().invoke(
        init_command, ["--cluster", "lab", "--tls", "--hosts", "mac1", "--config", str(path)]
    )
    assert result.exit_code == 0, result.output
    return load_cluster_config(path)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_mutual_tls_with_credentials_passes(tls_config: ClusterConfig, kind: str) -> None:
    auth = Auth(tls_config.secrets)
    srv = _start(kind, auth)
    try:
        with rpc.channel(srv.address, auth) as ch:
            assert _say(ch) == b"hi there"
            assert _count(ch) == [b"\x00", b"\x01", b"\x02"]

        async def aio_say() -> bytes:
            async with rpc.aio_channel(srv.address, auth) as ch:
                return await ch.unary_unary(SAY)(b"there", timeout=TIMEOUT)  # type: ignore[no-any-return]

        assert asyncio.run(aio_say()) == b"hi there"
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_tls_server_refuses_a_client_without_a_certificate(
    tls_config: ClusterConfig, kind: str
) -> None:
    auth = Auth(tls_config.secrets)
    assert auth.secrets is not None and auth.secrets.ca_cert is not None
    srv = _start(kind, auth)
    try:
        no_cert = grpc.ssl_channel_credentials(root_certificates=auth.secrets.ca_cert.read_bytes())
        with grpc.secure_channel(srv.address, no_cert, options=auth.channel_options()) as ch:
            signed = grpc.intercept_channel(ch, rpc.ClientAuthInterceptor(auth.secrets))
            with pytest.raises(grpc.RpcError) as info:
                _say(signed)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with rpc.channel(srv.address, Auth(ClusterSecrets("lab", auth.secrets.secret))) as ch:
            with pytest.raises(grpc.RpcError) as info:  # plaintext to a TLS port
                _say(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_certificates_of_another_cluster_ca_are_refused(
    tls_config: ClusterConfig, tmp_path: Path
) -> None:
    path = tmp_path / "cluster.json"
    CliRunner().invoke(init_command, ["--cluster", "lab", "--tls", "--config", str(path)])
    stranger = load_cluster_config(path).secrets
    same_secret = ClusterSecrets(
        "lab", tls_config.secrets.secret, stranger.ca_cert, stranger.node_cert, stranger.node_key
    )
    srv = _start("aio", Auth(tls_config.secrets))
    try:
        with rpc.channel(srv.address, Auth(same_secret)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                _say(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "TLS with" in rpc.describe_error(info.value, srv.address)
    finally:
        srv.stop()


# --- The configuration file -----------------------------------------------------------


def test_config_is_written_0600_in_a_0700_folder_and_reads_back(tmp_path: Path) -> None:
    path = default_config_path(home=tmp_path)
    config = ClusterConfig(SECRETS, model_dirs=(Path("~/models"),), api_key="k" * 20)
    save_cluster_config(path, config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = load_cluster_config(path, home=tmp_path)
    assert loaded.secrets == SECRETS
    assert loaded.model_dirs == (tmp_path / "models",)
    assert loaded.api_key == "k" * 20
    assert SECRETS.secret.hex() not in repr(loaded) and "k" * 20 not in repr(loaded)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "cluster.json"
    save_cluster_config(path, ClusterConfig(SECRETS))
    path.chmod(mode)
    with pytest.raises(ClusterConfigError) as info:
        load_cluster_config(path)
    expected = f"can be read by other users (mode {mode:04o}): run `chmod 600 {path}`"
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[]", "must hold a JSON object"),
        ('{"cluster": "lab"}', "has no 'secret'"),
        ('{"cluster": "lab", "secret": "not base64!"}', "not valid base64"),
        ('{"cluster": "lab", "secret": "AAAA"}', "at least 32 bytes"),
        ('{"cluster": "a b", "secret": ""}', "cluster name 'a b'"),
        ('{"cluster": "lab", "secret": "%s", "tls": "yes"}' % ("A" * 44), "'tls' must be"),
        ('{"cluster": "lab", "secret": "%s", "worker_port": 0}' % ("A" * 44), "port 0"),
    ],
)
def test_bad_config_files_get_one_clear_line(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ClusterConfigError, match=words):
        load_cluster_config(path)


def test_missing_config_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ClusterConfigError, match="run `pomona init`"):
        load_cluster_config(tmp_path / "nope.json")


def test_default_config_path_per_platform(tmp_path: Path) -> None:
    assert default_config_path(tmp_path, "linux") == tmp_path / ".config/pomona/cluster.json"
    assert default_config_path(tmp_path, "darwin") == (
        tmp_path / "Library/Application Support/pomona/cluster.json"
    )


# --- pomona init ----------------------------------------------------------------------


def _init(home: Path, *args: str) -> Any:
    return CliRunner().invoke(init_command, list(args), env={"HOME": str(home)})


def test_init_writes_a_private_config_and_says_how_to_copy_it(tmp_path: Path) -> None:
    result = _init(tmp_path, "--cluster", "lab")
    assert result.exit_code == 0, result.output
    path = tmp_path / ".config/pomona/cluster.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_cluster_config(path, home=tmp_path)
    assert config.cluster == "lab" and len(config.secrets.secret) == 32
    assert str(path) in result.output and "scp -p" in result.output
    assert config.secrets.fingerprint in result.output
    assert base64.b64encode(config.secrets.secret).decode() not in result.output


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    _init(tmp_path, "--cluster", "lab")
    path = tmp_path / ".config/pomona/cluster.json"
    before = load_cluster_config(path).secrets.secret
    refused = _init(tmp_path, "--cluster", "lab")
    assert refused.exit_code == 1 and "pass --force" in refused.output
    assert load_cluster_config(path).secrets.secret == before
    assert _init(tmp_path, "--cluster", "lab", "--force").exit_code == 0
    assert load_cluster_config(path).secrets.secret != before


def test_init_show_prints_no_secret(tmp_path: Path) -> None:
    _init(tmp_path, "--cluster", "lab", "--api-key")
    config = load_cluster_config(tmp_path / ".config/pomona/cluster.json")
    shown = _init(tmp_path, "--show")
    assert shown.exit_code == 0, shown.output
    assert "lab" in shown.output and config.secrets.fingerprint in shown.output
    assert base64.b64encode(config.secrets.secret).decode() not in shown.output
    assert config.api_key and config.api_key not in shown.output


def _names(cert_pem: bytes) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def test_init_tls_prepares_each_host_with_its_own_certificate(tmp_path: Path) -> None:
    result = _init(tmp_path, "--cluster", "lab", "--tls", "--hosts", "mac1,10.0.0.5")
    assert result.exit_code == 0, result.output
    root = tmp_path / ".config/pomona"
    expected = {
        "mac1": {"pomona-node", "mac1", "mac1.local"},
        "10.0.0.5": {"pomona-node", "10.0.0.5"},
    }
    for host, names in expected.items():
        bundle = root / "hosts" / host / "pomona"
        assert f"scp -rp {bundle} '{host}:Library/Application Support/'" in result.output
        config = load_cluster_config(bundle / "cluster.json")
        assert config.secrets.tls and not (bundle / "tls" / "ca-key.pem").exists()
        assert stat.S_IMODE((bundle / "tls" / "node-key.pem").stat().st_mode) == 0o600
        assert _names((bundle / "tls" / "node.pem").read_bytes()) == names
    assert stat.S_IMODE((root / "tls" / "ca-key.pem").stat().st_mode) == 0o600
    added = _init(tmp_path, "--add", "--hosts", "mac3")
    assert added.exit_code == 0, added.output
    mac3 = load_cluster_config(root / "hosts/mac3/pomona/cluster.json")
    assert mac3.secrets.secret == load_cluster_config(root / "cluster.json").secrets.secret
    replaced = _init(tmp_path, "--force", "--hosts", "mac2")
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (root / "hosts").iterdir()) == ["mac2"]  # old secrets gone
    assert not (root / "tls").exists()


def test_init_refuses_bad_host_names(tmp_path: Path) -> None:
    result = _init(tmp_path, "--hosts", "mac1,bad host")
    assert result.exit_code == 2 and "'bad host' is not a host name" in result.output
