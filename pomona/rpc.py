"""gRPC channels and servers, made once: options, deadlines, cluster credentials, TLS.

Given an ``Auth`` (``pomona.security``), every channel signs each call with the cluster
secret, for the server it is meant for (``target``: a worker's node id, "" for the
coordinator) and for its request's bytes (``pomona.tokens``); every server refuses calls
that do not carry a valid signature for itself and for the request it got, with
``UNAUTHENTICATED`` and a one-line reason, before it parses the request. With TLS, both
sides also present certificates of the cluster's CA.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from concurrent import futures
from typing import Any, NamedTuple

import grpc

from pomona.security import Auth, ClusterSecrets
from pomona.tokens import AUTH_METADATA_KEY, WRONG_BODY, Accepted, Verifier, body_digest, sign

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20

OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Each channel its own connections: gRPC otherwise shares them between channels
    # to one address, and with them the reconnect backoff (1 s, growing) of a server
    # that went away. A re-formed pipeline's head listens on the old head's address
    # (--runner-port) within a second now, and a request sent to it on a fresh
    # channel failed at once with the old head's "connection refused".
    ("grpc.use_local_subchannel_pool", 1),
]
# Servers must accept the clients' keepalive pings above (every 10 s, also
# between calls), or they answer GOAWAY "too_many_pings" and drop the channel.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *OPTIONS,
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use then
    # starts silently and takes half of the first one's connections.
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
]

# Deadlines, in seconds.
DESCRIBE_TIMEOUT = 5.0
CONTROL_TIMEOUT = 10.0
# Reading a model's profile builds the model lazily: seconds on a busy machine.
INSPECT_TIMEOUT = 60.0
WAKE_TIMEOUT = 5.0
# A generation stream may run long; tokens keep it alive.
GENERATE_TIMEOUT = 3600.0
# Trailing metadata of an error that ended one request, the pipeline unharmed.
REQUEST_FAULT = "pomona-request-fault"


def aio_channel(address: str, auth: Auth | None = None, target: str = "") -> grpc.aio.Channel:
    """A channel to the server named ``target`` in tokens ("" for the coordinator)."""
    if auth is None or auth.secrets is None:
        return grpc.aio.insecure_channel(address, options=OPTIONS)
    interceptors = aio_client_interceptors(auth.secrets, target)
    creds = auth.channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(address, options=OPTIONS, interceptors=interceptors)
    options = OPTIONS + auth.channel_options()
    return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)


def channel(address: str, auth: Auth | None = None, target: str = "") -> grpc.Channel:
    """A channel to the server named ``target`` in tokens ("" for the coordinator)."""
    if auth is None or auth.secrets is None:
        return grpc.insecure_channel(address, options=OPTIONS)
    creds = auth.channel_credentials()
    if creds is None:
        plain = grpc.insecure_channel(address, options=OPTIONS)
    else:
        plain = grpc.secure_channel(address, creds, options=OPTIONS + auth.channel_options())
    return grpc.intercept_channel(plain, ClientAuthInterceptor(auth.secrets, target))


def aio_server(auth: Auth | None = None, target: str = "") -> grpc.aio.Server:
    """A server named ``target`` in tokens: a worker's node id, "" for the coordinator."""
    verifier = auth.verifier(target=target) if auth else None
    interceptors = [AioServerAuthInterceptor(verifier)] if verifier is not None else None
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)


def server(
    executor: futures.ThreadPoolExecutor,
    auth: Auth | None = None,
    target: str = "",
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Server:
    """A sync server (the head runner's) named ``target``, checking credentials if given."""
    verifier = auth.verifier(target=target) if auth else None
    interceptors = [ServerAuthInterceptor(verifier)] if verifier is not None else None
    options = SERVER_OPTIONS + (options or [])
    return grpc.server(executor, options=options, interceptors=interceptors)


def add_port(server: grpc.Server | grpc.aio.Server, address: str, auth: Auth | None = None) -> int:
    """Listen on ``address`` ("host:port"), with mutual TLS when ``auth`` has it.

    Raises ``OSError`` when the address cannot be bound (a port in use).
    """
    creds = auth.server_credentials() if auth else None
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as e:  # grpcio 1.5x+ raises where older versions returned 0
        raise OSError(f"cannot listen on {address}: the port is in use or not allowed") from e
    if port == 0:
        raise OSError(f"cannot listen on {address}: the port is in use or not allowed")
    return port


# How grpc words a connection that broke after the call had started.
_CUT_OFF = ("socket closed", "connection reset", "broken pipe", "goaway", "end of tcp stream")


def describe_error(err: grpc.RpcError, address: str) -> str:
    """One line for a user: what failed and where."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    details = " ".join((details or "").split())
    lowered = details.lower()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = ""
        if details.startswith(("credentials of cluster", "wrong cluster secret")):
            hint = " (pass --config with the cluster.json of the cluster at that address)"
        return f"{address} refused this machine's cluster credentials: {details}{hint}"
    if code == grpc.StatusCode.UNAVAILABLE and any(
        word in lowered for word in ("ssl", "handshake", "certificate", "tls")
    ):
        return (
            f"TLS with {address} failed: both machines need certificates from the same "
            f"`pomona init --tls` ({details})"
        )
    if code == grpc.StatusCode.UNAVAILABLE and "http1.x server" in lowered:
        return f"{address} is an HTTP port, not a gRPC one: pass the server's gRPC port"
    if code == grpc.StatusCode.UNAVAILABLE and "cancelling all calls" in lowered:
        return f"{address} shut down while answering: the reply was cut off"
    if (
        code == grpc.StatusCode.UNAVAILABLE
        and "failed to connect" not in lowered
        and any(word in lowered for word in _CUT_OFF)
    ):
        return f"the connection to {address} broke while answering: the reply was cut off"
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in lowered:
        return f"cannot reach {address}: is it running? ({details})"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{address} does not serve this call: is it the right port? ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{address} did not answer in time"
    return details or f"{address} failed with {code}"


# --- Client side: sign every call -----------------------------------------------------


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _body(request: Any) -> bytes:
    """The bytes a request goes on the wire as (stubs serialize with SerializeToString)."""
    return request if isinstance(request, bytes) else request.SerializeToString()


class ClientAuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``x-pomona-auth`` to every call of a sync channel."""

    def __init__(self, secrets: ClusterSecrets, target: str = "") -> None:
        self.secrets = secrets
        self.target = target

    def _details(self, d: Any, body: bytes | None) -> grpc.ClientCallDetails:
        method = _method_name(d.method)
        token = sign(self.secrets, method, target=self.target, body=body)
        metadata = [*(d.metadata or ()), (AUTH_METADATA_KEY, token)]
        return _SyncCallDetails(method, d.timeout, metadata, d.credentials,
                                getattr(d, "wait_for_ready", None),
                                getattr(d, "compression", None))  # fmt: skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, _body(request)), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, _body(request)), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details, None), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details, None), requests)


class _AioClientAuth:
    def __init__(self, secrets: ClusterSecrets, target: str = "") -> None:
        self.secrets = secrets
        self.target = target

    def _details(self, d: Any, body: bytes | None) -> grpc.aio.ClientCallDetails:
        token = sign(self.secrets, _method_name(d.method), target=self.target, body=body)
        metadata = grpc.aio.Metadata(*(d.metadata or ()), (AUTH_METADATA_KEY, token))
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready
        )


# grpc.aio sorts interceptors by kind with isinstance/elif: one class per kind.
class _AioUnaryUnary(_AioClientAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, _body(request)), request)


class _AioUnaryStream(_AioClientAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, _body(request)), request)


class _AioStreamUnary(_AioClientAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details, None), requests)


class _AioStreamStream(_AioClientAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details, None), requests)


def aio_client_interceptors(
    secrets: ClusterSecrets, target: str = ""
) -> list[grpc.aio.ClientInterceptor]:
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return [kind(secrets, target) for kind in kinds]


# --- Server side: refuse calls without proof ------------------------------------------


class _RefusalLog:
    """Logs refusals at WARNING, at most once per peer host and reason every 10 s."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, method: str, peer: str, why: str) -> None:
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        with self._lock:
            if now - self._last.get((host, why), -1e9) < 10.0:
                return
            if len(self._last) > 1024:
                self._last.clear()
            self._last[(host, why)] = now
        log.warning("refused %s from %s: %s", method, peer, why)


_KINDS: dict[tuple[bool, bool], Any] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
# What a request whose bytes do not match its token's digest parses to.
_CHANGED = object()


def _same_kind(
    handler: grpc.RpcMethodHandler, behavior: Any, deserializer: Any = None
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s streaming kind that runs ``behavior``.

    Without ``deserializer`` it never parses the request: a caller without credentials
    gets no protobuf parser.
    """
    make = _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(  # type: ignore[no-any-return]
        behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer
    )


def _behavior(handler: grpc.RpcMethodHandler) -> Any:
    kinds = (handler.unary_unary, handler.unary_stream, handler.stream_unary)
    return next((b for b in kinds if b is not None), handler.stream_stream)


def _digest_checker(handler: grpc.RpcMethodHandler, digest: str) -> Any:
    """A request deserializer that parses only bytes whose SHA-256 is ``digest``."""
    parse = handler.request_deserializer

    def deserialize(raw: bytes) -> Any:
        if body_digest(raw) != digest:
            return _CHANGED
        return parse(raw) if parse is not None else raw

    return deserialize


def _sync_body_checked(
    handler: grpc.RpcMethodHandler, accepted: Accepted, refuse: Any
) -> grpc.RpcMethodHandler:
    if handler.request_streaming:  # no one digest to check: the token covers no body
        return handler
    inner = _behavior(handler)

    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        if request is _CHANGED:
            refuse(request, context)
        return inner(request, context)

    return _same_kind(handler, checked, _digest_checker(handler, accepted.digest))


def _aio_body_checked(
    handler: grpc.RpcMethodHandler, accepted: Accepted, refuse: Any
) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        return handler
    inner = _behavior(handler)
    checked: Any
    if inspect.isasyncgenfunction(inner):

        async def checked(request: Any, context: Any) -> Any:
            if request is _CHANGED:
                await refuse(request, context)
            async for item in inner(request, context):
                yield item

    else:

        async def checked(request: Any, context: Any) -> Any:
            if request is _CHANGED:
                await refuse(request, context)
            return await inner(request, context)

    return _same_kind(handler, checked, _digest_checker(handler, accepted.digest))


class ServerAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls to a sync ``grpc.server`` without valid proof of the secret."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._log = _RefusalLog()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        result = self.verifier.accept(details.method, details.invocation_metadata)
        handler = continuation(details)
        if result is None or handler is None:
            return handler

        def refuse(_request: Any, context: grpc.ServicerContext) -> None:
            why = result if isinstance(result, str) else WRONG_BODY
            self._log(details.method, context.peer(), why)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        if isinstance(result, Accepted):
            return _sync_body_checked(handler, result, refuse)
        return _same_kind(handler, refuse)


class AioServerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to a ``grpc.aio`` server without valid proof of the secret.

    The refusal runs as the method's handler (same streaming kind and serializers), so
    the caller gets ``UNAUTHENTICATED`` with the reason rather than a generic error.
    """

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._log = _RefusalLog()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        result = self.verifier.accept(details.method, details.invocation_metadata)
        handler = await continuation(details)
        if result is None or handler is None:
            return handler

        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            why = result if isinstance(result, str) else WRONG_BODY
            self._log(details.method, context.peer(), why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        if isinstance(result, Accepted):
            return _aio_body_checked(handler, result, refuse)
        return _same_kind(handler, refuse)
