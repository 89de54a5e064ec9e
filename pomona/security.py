"""The cluster's secret, its configuration file, TLS, and what servers and channels get.

Every call carries ``x-pomona-auth: v2.<cluster>.<target>.<unix_ms>.<nonce>.<body>.<hmac>``
where the HMAC-SHA256 under the cluster secret covers the cluster, the server the call is
for (a worker's node id; empty for the coordinator), the full method name, the time, the
nonce and the SHA-256 of the serialized request. Servers check it in an interceptor
(constant-time compare, their own target, a window of ±300 s, each nonce once, then the
body's digest before it is parsed) and answer ``UNAUTHENTICATED`` otherwise. Workers
prove the secret back in ``Describe`` (``describe_proof``). TLS with a cluster CA
(``pomona init --tls``) adds encryption and mutual certificate checks on top.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets as random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pomona.config import DEFAULT_COORDINATOR_PORT, DEFAULT_WORKER_PORT
from pomona.tokens import CLUSTER_NAME, Verifier

log = logging.getLogger(__name__)

SECRET_BYTES = 32
CONFIG_FILE = "cluster.json"
# Every node certificate carries this name and channels check it: addresses come from
# Bonjour and change, and any certificate the cluster's own CA signed is a member.
TLS_SERVER_NAME = "pomona-node"

_CLUSTER_NAME = re.compile(CLUSTER_NAME)
_TLS_KEYS = ("ca_cert", "node_cert", "node_key")


class ClusterConfigError(ValueError):
    """A missing, unreadable, unsafe or invalid cluster configuration (one line)."""


@dataclass(frozen=True)
class ClusterSecrets:
    """What proves membership: the cluster name, its secret, and optional TLS files."""

    cluster: str
    secret: bytes = field(repr=False)
    ca_cert: Path | None = None
    node_cert: Path | None = None
    node_key: Path | None = None

    def __post_init__(self) -> None:
        check_cluster_name(self.cluster)
        if len(self.secret) < SECRET_BYTES:
            raise ClusterConfigError(f"the cluster secret must be at least {SECRET_BYTES} bytes")
        tls = (self.ca_cert, self.node_cert, self.node_key)
        if any(tls) and not all(tls):
            raise ClusterConfigError("TLS needs all three files: ca_cert, node_cert, node_key")

    @classmethod
    def generate(cls, cluster: str) -> ClusterSecrets:
        return cls(cluster, random.token_bytes(SECRET_BYTES))

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None

    @property
    def fingerprint(self) -> str:
        """Eight hex digits to compare across machines without showing the secret."""
        return hashlib.sha256(b"pomona-fingerprint|" + self.secret).hexdigest()[:8]


@dataclass(frozen=True)
class ClusterConfig:
    """The contents of ``cluster.json``: the same file on every machine of a cluster."""

    secrets: ClusterSecrets
    coordinator_port: int = DEFAULT_COORDINATOR_PORT
    worker_port: int = DEFAULT_WORKER_PORT
    model_dirs: tuple[Path, ...] = ()
    api_key: str | None = field(default=None, repr=False)

    @property
    def cluster(self) -> str:
        return self.secrets.cluster


def check_cluster_name(name: str) -> str:
    if not _CLUSTER_NAME.fullmatch(name):
        raise ClusterConfigError(
            f"cluster name {name!r} must be 1 to 63 letters, digits, '.', '_' or '-'"
        )
    return name


def default_config_dir(home: Path | None = None, platform: str | None = None) -> Path:
    home = home if home is not None else Path.home()
    if (platform or sys.platform) == "darwin":
        return home / "Library" / "Application Support" / "pomona"
    return home / ".config" / "pomona"


def default_config_path(home: Path | None = None, platform: str | None = None) -> Path:
    return default_config_dir(home, platform) / CONFIG_FILE


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically; a new folder gets mode 0700."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True)
        os.chmod(path.parent, 0o700)  # whatever the umask
    tmp = path.with_name(f".{path.name}.{random.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_private(path: Path) -> bytes:
    """Read a file that holds a secret, refusing one that other users can read."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ClusterConfigError(
                f"{path} can be read by other users (mode {mode:04o}): run `chmod 600 {path}`"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise ClusterConfigError(f"{path} does not exist: run `pomona init` first") from None
    except OSError as e:
        raise ClusterConfigError(f"cannot read {path}: {e.strerror}") from None


def save_cluster_config(path: Path, config: ClusterConfig) -> None:
    """Write ``config`` to ``path`` (0600); TLS paths are stored relative to its folder."""
    s = config.secrets
    data: dict[str, Any] = {
        "version": 1,
        "cluster": s.cluster,
        "secret": base64.b64encode(s.secret).decode(),
        "coordinator_port": config.coordinator_port,
        "worker_port": config.worker_port,
        "model_dirs": [str(d) for d in config.model_dirs],
        "api_key": config.api_key,
    }
    if s.tls:
        data["tls"] = {key: _relative(getattr(s, key), path.parent) for key in _TLS_KEYS}
    write_private(path, (json.dumps(data, indent=2) + "\n").encode())


def _relative(file: Path | None, base: Path) -> str:
    assert file is not None
    return str(file.relative_to(base)) if file.is_relative_to(base) else str(file)


def load_cluster_config(path: Path, home: Path | None = None) -> ClusterConfig:
    """Read ``path``; '~' in model directories is ``home`` (default: this user's home)."""
    raw = read_private(path)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClusterConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path} must hold a JSON object")
    try:
        secret = base64.b64decode(str(data["secret"]), validate=True)
        tls = data.get("tls") or {}
        dirs = data.get("model_dirs") or []
        if not isinstance(tls, dict) or not isinstance(dirs, list):
            raise ClusterConfigError("'tls' must be an object and 'model_dirs' a list")
        tls_paths = {k: _resolve(path.parent, tls.get(k)) for k in _TLS_KEYS}
        secrets = ClusterSecrets(check_cluster_name(str(data["cluster"])), secret, **tls_paths)
        home = home if home is not None else Path.home()
        model_dirs = tuple(_expand(str(d), home) for d in dirs)
        api_key = data.get("api_key")
        return ClusterConfig(
            secrets=secrets,
            coordinator_port=_port(data.get("coordinator_port", DEFAULT_COORDINATOR_PORT)),
            worker_port=_port(data.get("worker_port", DEFAULT_WORKER_PORT)),
            model_dirs=model_dirs,
            api_key=str(api_key) if api_key else None,
        )
    except KeyError as e:
        raise ClusterConfigError(f"{path} has no {e.args[0]!r}: run `pomona init`") from None
    except binascii.Error:
        raise ClusterConfigError(f"{path}: the secret is not valid base64") from None
    except (ClusterConfigError, TypeError, ValueError) as e:
        raise ClusterConfigError(f"{path}: {e}") from None


def _resolve(base: Path, value: object) -> Path | None:
    return None if not value else base / str(value)


def _expand(value: str, home: Path) -> Path:
    if value == "~" or value.startswith("~/"):
        return home / value[2:]
    return Path(value)


def _port(value: object) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ClusterConfigError(f"port {value!r} must be a number from 1 to 65535")
    return value


# --- TLS ------------------------------------------------------------------------------


def _tls_files(secrets: ClusterSecrets) -> tuple[bytes, bytes, bytes]:
    assert secrets.ca_cert and secrets.node_cert and secrets.node_key
    try:
        return (
            secrets.ca_cert.read_bytes(),
            secrets.node_cert.read_bytes(),
            read_private(secrets.node_key),
        )
    except OSError as e:
        raise ClusterConfigError(
            f"cannot read TLS file {e.filename}: copy the tls folder made by "
            "`pomona init --tls` for this machine"
        ) from None


def server_credentials(secrets: ClusterSecrets) -> grpc.ServerCredentials | None:
    """Mutual TLS for a server (client certificates required), or None without TLS."""
    if not secrets.tls:
        return None
    ca, cert, key = _tls_files(secrets)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(secrets: ClusterSecrets) -> grpc.ChannelCredentials | None:
    """TLS for a channel, presenting this node's certificate, or None without TLS."""
    if not secrets.tls:
        return None
    ca, cert, key = _tls_files(secrets)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


# --- What servers and channels are given ----------------------------------------------


@dataclass(frozen=True)
class Auth:
    """How this process proves and checks membership; ``Auth.none()`` checks nothing."""

    secrets: ClusterSecrets | None = None

    @classmethod
    def none(cls) -> Auth:
        return cls(None)

    @classmethod
    def load(cls, path: Path) -> Auth:
        return cls(load_cluster_config(path).secrets)

    @property
    def enabled(self) -> bool:
        return self.secrets is not None

    @property
    def tls(self) -> bool:
        return self.secrets is not None and self.secrets.tls

    def verifier(self, clock: Callable[[], float] = time.time, target: str = "") -> Verifier | None:
        """A fresh verifier (with its own replay cache) for the server named ``target``."""
        return Verifier(self.secrets, clock, target=target) if self.secrets else None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.secrets) if self.secrets else None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return channel_credentials(self.secrets) if self.secrets else None

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", TLS_SERVER_NAME)] if self.tls else []


def write_local_config(
    directory: Path, cluster: str, coordinator_port: int = DEFAULT_COORDINATOR_PORT
) -> Path:
    """An ephemeral configuration for ``pomona up --local``: a fresh secret, mode 0600.

    It records the coordinator's port, so that clients of that coordinator find it.
    """
    path = directory / CONFIG_FILE
    config = ClusterConfig(ClusterSecrets.generate(cluster), coordinator_port=coordinator_port)
    save_cluster_config(path, config)
    return path
