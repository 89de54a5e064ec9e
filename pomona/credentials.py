"""Finding this machine's cluster configuration, at the CLI edge.

Daemons need one (or ``--insecure``); client commands use one when there is
one. Looked for in order: ``--config`` / ``POMONA_CONFIG``; for a client of a
``pomona up --local`` coordinator on this machine, that cluster's configuration
(it records its coordinator's port); the user's config directory (``pomona
init`` writes there); then the local cluster's configuration.
"""

from __future__ import annotations

from pathlib import Path

import click

from pomona.config import default_state_dir
from pomona.security import (
    Auth,
    ClusterConfig,
    ClusterConfigError,
    default_config_path,
    load_cluster_config,
)

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="POMONA_CONFIG",
    default=None,
    help="Cluster configuration [default: the one `pomona init` wrote, or a local cluster's].",
)

MISSING = (
    "no cluster configuration: run `pomona init` on one machine, copy its cluster.json to "
    "{path} on the others (see docs/security.md), or pass --insecure to run without a secret"
)


def local_config_path() -> Path:
    """Where ``pomona up --local`` keeps its ephemeral configuration."""
    return default_state_dir() / "local" / "cluster.json"


def find_config(path: Path | None) -> ClusterConfig | None:
    """The configuration at ``path``, or the first one found, or None."""
    candidates = [path] if path is not None else [default_config_path(), local_config_path()]
    for candidate in candidates:
        if candidate.exists():
            try:
                return load_cluster_config(candidate)
            except ClusterConfigError as e:
                raise click.ClickException(str(e)) from None
    if path is not None:
        raise click.ClickException(f"no cluster configuration at {path}")
    return None


def config_for_daemon(
    path: Path | None, insecure: bool
) -> tuple[ClusterConfig | None, Path | None]:
    """A daemon's configuration and its file; refuses to run without one unless insecure."""
    if insecure:
        return None, None
    config = find_config(path)
    if config is None:
        raise click.ClickException(MISSING.format(path=default_config_path()))
    found = path or next(p for p in (default_config_path(), local_config_path()) if p.exists())
    return config, found


def client_auth(path: Path | None, coordinator: str = "") -> Auth:
    """The credentials for a client of the coordinator at ``coordinator`` ("host:port").

    Without ``--config``, a ``pomona up --local`` cluster's own configuration is used
    for its coordinator (on loopback, at the port it records), whatever else
    ``pomona init`` wrote on this machine.
    """
    config = _local_config_for(coordinator) if path is None else None
    config = config or find_config(path)
    return Auth(config.secrets) if config is not None else Auth.none()


def _local_config_for(coordinator: str) -> ClusterConfig | None:
    host, _, port = coordinator.rpartition(":")
    local = local_config_path()
    if host not in ("127.0.0.1", "localhost") or not port.isdigit() or not local.exists():
        return None
    try:
        config = load_cluster_config(local)
    except ClusterConfigError:
        return None
    return config if config.coordinator_port == int(port) else None
