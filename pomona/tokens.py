"""Proof of the cluster secret: a token on every gRPC call, and a worker's proof in Describe.

Every call carries ``x-pomona-auth: v2.<cluster>.<target>.<unix_ms>.<nonce>.<body>.<hmac>``
where the HMAC-SHA256 under the cluster secret covers the cluster, the server the call is
for (a worker's node id, ``<node id>/<load id>`` for a head runner, "" for the
coordinator), the full method name, the time, the nonce and the SHA-256 of the
serialized request. Servers check it in an interceptor (constant-time compare, their
own name, a window of ±300 s, each nonce once, then the body's digest before it is
parsed) and answer ``UNAUTHENTICATED`` otherwise. A worker proves the secret back by
answering the coordinator's fresh challenge in ``Describe`` (``describe_proof``).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets as random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pomona.security import ClusterSecrets

AUTH_METADATA_KEY = "x-pomona-auth"
TOKEN_VERSION = "v2"
MAX_SKEW_SECONDS = 300
REPLAY_CACHE_SIZE = 100_000
# Services any caller may reach: load balancers and probes call health without secrets.
EXEMPT_SERVICES: frozenset[str] = frozenset({"grpc.health.v1.Health"})
CLUSTER_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"

MISSING = (
    "missing cluster credentials: run `pomona init` on one machine and copy its "
    "cluster.json to this machine (see docs/security.md)"
)
MALFORMED = "malformed cluster credentials"
WRONG_SECRET = (
    "wrong cluster secret: copy this cluster's cluster.json from the machine where "
    "`pomona init` ran"
)
REPLAYED = "replayed request: these credentials were already used"
WRONG_TARGET = "credentials for another server: a call signed for one node is refused by others"
WRONG_BODY = "the request does not match its credentials: it was changed on the way"
# Methods a caller may sign without knowing the server's node id: first contact.
UNBOUND_METHODS: frozenset[str] = frozenset({"/pomona.v1.Worker/Describe"})

# A server's name in tokens: a node id, "<node id>/<load id>" for a head runner, or "".
_TARGET = re.compile(r"[A-Za-z0-9_/-]{0,160}")
# <cluster>.<target>.<unix_ms>.<nonce>.<body>.<hmac>, after "v2."; cluster names may
# hold dots, targets may not.
_TOKEN = re.compile(
    rf"({CLUSTER_NAME})\.({_TARGET.pattern})\.(\d{{1,15}})\.([0-9a-f]{{32}})"
    r"\.([0-9a-f]{64})\.([0-9a-f]{64})"
)


# --- Tokens on every call ---------------------------------------------------------

# The digest of a request the token does not cover (request-streaming calls).
STREAM_BODY = hashlib.sha256(b"").hexdigest()


def is_target(name: str) -> bool:
    """Whether ``name`` can name a server in tokens (node ids of real workers can)."""
    return _TARGET.fullmatch(name) is not None


def runner_target(node_id: str, load_id: str) -> str:
    """A head runner's name in tokens: one load on one node."""
    return f"{node_id}/{load_id}"


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign(
    secrets: ClusterSecrets,
    method: str,
    *,
    target: str = "",
    body: bytes | None = None,
    unix_ms: int | None = None,
    nonce: str | None = None,
) -> str:
    """The ``x-pomona-auth`` value for one call of ``method`` (``/pomona.v1.Worker/Load``).

    ``target`` names the server (a worker's node id, "" for the coordinator) and
    ``body`` is the serialized request (None for a request stream).
    """
    if not is_target(target):
        raise ValueError(f"{target!r} cannot name a server in credentials")
    unix_ms = int(time.time() * 1000) if unix_ms is None else unix_ms
    nonce = random.token_hex(16) if nonce is None else nonce
    digest = STREAM_BODY if body is None else body_digest(body)
    mac = _mac(secrets, target, method, unix_ms, nonce, digest)
    return f"{TOKEN_VERSION}.{secrets.cluster}.{target}.{unix_ms}.{nonce}.{digest}.{mac}"


def _mac(
    secrets: ClusterSecrets, target: str, method: str, unix_ms: int, nonce: str, digest: str
) -> str:
    message = f"{secrets.cluster}|{target}|{method}|{unix_ms}|{nonce}|{digest}".encode()
    return hmac.new(secrets.secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Accepted:
    """A call whose credentials hold; its body must still match ``digest``."""

    digest: str


class Verifier:
    """Checks ``x-pomona-auth`` values; one per server, as it remembers nonces.

    ``target`` is this server's name in tokens: its node id ("" for the coordinator).
    """

    def __init__(
        self,
        secrets: ClusterSecrets,
        clock: Callable[[], float] = time.time,
        cache_size: int = REPLAY_CACHE_SIZE,
        target: str = "",
    ) -> None:
        self.secrets = secrets
        self.target = target
        self._clock = clock
        self._cache_size = cache_size
        self._seen: set[str] = set()
        self._expiry: list[tuple[int, str]] = []  # heap of (forget after, in ms; nonce)
        self._lock = threading.Lock()

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None if the call may proceed (body unchecked), else why not (one line)."""
        result = self.accept(method, metadata)
        return result if isinstance(result, str) else None

    def accept(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> Accepted | str | None:
        """Why the call is refused; or what its body must hash to; None for exempt calls."""
        parts = method.split("/")
        if len(parts) == 3 and parts[1] in EXEMPT_SERVICES:
            return None
        value = next((v for k, v in metadata or () if k == AUTH_METADATA_KEY), None)
        if value is None:
            return MISSING
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        version, _, rest = value.partition(".")
        if version != TOKEN_VERSION:
            if re.fullmatch(r"v\d{1,3}", version):
                return f"credentials of version {version}: use the same pomona on both machines"
            return MALFORMED
        match = _TOKEN.fullmatch(rest) if len(rest) < 512 else None
        if match is None:
            return MALFORMED
        cluster, target, ms, nonce, digest, mac = match.groups()
        if cluster != self.secrets.cluster:
            return f"credentials of cluster {cluster!r}, this is cluster {self.secrets.cluster!r}"
        if not hmac.compare_digest(_mac(self.secrets, target, method, int(ms), nonce, digest), mac):
            return WRONG_SECRET
        if target != self.target and not (target == "" and method in UNBOUND_METHODS):
            return WRONG_TARGET
        now = int(self._clock() * 1000)
        skew = (int(ms) - now) / 1000
        if abs(skew) > MAX_SKEW_SECONDS:
            return (
                f"stale credentials: the caller's clock is {skew:+.0f} s off this machine's "
                f"(at most {MAX_SKEW_SECONDS} s): turn on network time on both machines"
            )
        return self._remember(nonce, int(ms) + MAX_SKEW_SECONDS * 1000, now) or Accepted(digest)

    @property
    def remembered(self) -> int:
        """How many nonces are remembered."""
        return len(self._seen)

    def _remember(self, nonce: str, forget_after: int, now: int) -> str | None:
        with self._lock:
            while self._expiry and (
                self._expiry[0][0] < now or len(self._expiry) >= self._cache_size
            ):
                self._seen.discard(heapq.heappop(self._expiry)[1])
            if nonce in self._seen:
                return REPLAYED
            self._seen.add(nonce)
            heapq.heappush(self._expiry, (forget_after, nonce))
        return None


# --- Proof of the secret by a worker ----------------------------------------------

CHALLENGE_BYTES = 32


def new_challenge() -> bytes:
    return random.token_bytes(CHALLENGE_BYTES)


def describe_proof(secrets: ClusterSecrets, challenge: bytes, node_id: str, reply: bytes) -> str:
    """A worker's answer to a coordinator's challenge: it holds the secret and said ``reply``.

    ``reply`` is the ``DescribeReply`` serialized deterministically without its proof.
    """
    digest = hashlib.sha256(reply).hexdigest()
    message = f"pomona-describe|{secrets.cluster}|{challenge.hex()}|{node_id}|{digest}".encode()
    return hmac.new(secrets.secret, message, hashlib.sha256).hexdigest()


def check_describe_proof(
    secrets: ClusterSecrets, challenge: bytes, node_id: str, reply: bytes, proof: str
) -> bool:
    expected = describe_proof(secrets, challenge, node_id, reply)
    return hmac.compare_digest(expected, proof)
