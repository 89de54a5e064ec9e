"""gRPC channel and server options and deadlines, defined once."""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 16 << 20

OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Deadlines, in seconds.
DESCRIBE_TIMEOUT = 5.0
CONTROL_TIMEOUT = 10.0
WAKE_TIMEOUT = 5.0
# A generation stream may run long; tokens keep it alive.
GENERATE_TIMEOUT = 3600.0


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=OPTIONS)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=OPTIONS)


def aio_server() -> grpc.aio.Server:
    return grpc.aio.server(options=OPTIONS)


def describe_error(err: grpc.RpcError, address: str) -> str:
    """One line for a user: what failed and where."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        return f"cannot reach {address}: is it running? ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{address} did not answer in time"
    return details or f"{address} failed with {code}"
