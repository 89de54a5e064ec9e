"""Finding this machine's cluster configuration, at the CLI edge.

Daemons need one (or ``--insecure``); client commands use one when there is
one. Looked for in order: ``--config`` / ``POMONA_CONFIG``, the user's
config directory (``pomona init`` writes there), then the configuration of a
``pomona up --local`` cluster on this machine.
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


def client_auth(path: Path | None) -> Auth:
    config = find_config(path)
    return Auth(config.secrets) if config is not None else Auth.none()
