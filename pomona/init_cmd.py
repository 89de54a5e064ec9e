"""``pomona init``: create a cluster's configuration, and with ``--tls`` its CA and certificates.

Layout of the configuration folder on the machine where it ran::

    cluster.json            this machine's configuration (secret inside, mode 0600)
    tls/ca.pem, ca-key.pem  the cluster's CA; the key never leaves this machine
    tls/node.pem, node-key.pem          this machine's certificate
    hosts/<host>/pomona/    what to copy into each Mac's configuration folder
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shlex
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from pomona.config import DEFAULT_COORDINATOR_PORT, DEFAULT_WORKER_PORT
from pomona.security import (
    CONFIG_FILE,
    TLS_SERVER_NAME,
    ClusterConfig,
    ClusterConfigError,
    ClusterSecrets,
    check_cluster_name,
    default_config_path,
    load_cluster_config,
    read_private,
    save_cluster_config,
    write_private,
)

CA_YEARS = 10
NODE_YEARS = 10
# Where a Mac's configuration lives, relative to its home (what scp's remote paths are).
MAC_CONFIG_PARENT = "Library/Application Support/"
DEFAULT_MODEL_DIRS = ("~/models", "~/.cache/pomona/models")
TLS_FILES = ("tls/ca.pem", "tls/node.pem", "tls/node-key.pem")

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def create_ca(cluster: str, years: int = CA_YEARS) -> tuple[bytes, bytes]:
    """A self-signed CA for ``cluster``: (certificate PEM, private key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pomona {cluster} CA")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key)


def issue_node_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, host: str, extra_names: tuple[str, ...] = ()
) -> tuple[bytes, bytes]:
    """A certificate for ``host`` signed by the CA, valid as TLS server and client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(TLS_SERVER_NAME)]
    for value in (host, *extra_names):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            names.append(x509.DNSName(value))
            if "." not in value and value != "localhost":
                names.append(x509.DNSName(f"{value}.local"))
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(min(now + timedelta(days=365 * NODE_YEARS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pem(cert, key)


def _pem(cert: object, key: object) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem  # type: ignore[attr-defined]


def _parse_hosts(value: str | None) -> tuple[str, ...]:
    hosts = tuple(dict.fromkeys(h.strip() for h in (value or "").split(",") if h.strip()))
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if len(host) > 253 or not _HOSTNAME.fullmatch(host):
                raise click.BadParameter(f"{host!r} is not a host name or IP address") from None
    return hosts


def _write_node(file: Path, config: ClusterConfig, ca: tuple[bytes, bytes] | None,
                host: str, extra: tuple[str, ...] = ()) -> None:  # fmt: skip
    """``file``, plus a tls/ folder beside it with ``host``'s certificate under TLS."""
    secrets = config.secrets
    if ca is not None:
        cert, key = issue_node_cert(ca[0], ca[1], host, extra)
        tls = file.parent / "tls"
        for name, data in (("ca.pem", ca[0]), ("node.pem", cert), ("node-key.pem", key)):
            write_private(tls / name, data)
        secrets = ClusterSecrets(
            secrets.cluster, secrets.secret, tls / "ca.pem", tls / "node.pem", tls / "node-key.pem"
        )
    node = ClusterConfig(
        secrets, config.coordinator_port, config.worker_port, config.model_dirs, config.api_key
    )
    save_cluster_config(file, node)


def _copy_line(bundle: Path, host: str) -> str:
    target = f"[{host}]" if ":" in host else host
    remote = shlex.quote(f"{target}:{MAC_CONFIG_PARENT}")
    return f"  {host}: scp -rp {shlex.quote(str(bundle))} {remote}"


def _show(path: Path) -> None:
    config = load_cluster_config(path, home=Path("~"))
    s = config.secrets
    click.echo(f"configuration  {path} (mode {path.stat().st_mode & 0o777:04o})")
    click.echo(f"cluster        {s.cluster}")
    click.echo(f"secret         hidden ({len(s.secret)} bytes, fingerprint {s.fingerprint})")
    click.echo(f"ports          coordinator {config.coordinator_port}, worker {config.worker_port}")
    click.echo(f"model dirs     {', '.join(map(str, config.model_dirs)) or '(none)'}")
    click.echo(f"HTTP API key   {'set (hidden)' if config.api_key else 'none'}")
    if not s.tls or s.node_cert is None:
        click.echo("TLS            off")
        return
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(s.node_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    shown = ", ".join(str(getattr(n, "value", n)) for n in names)
    click.echo(f"TLS            CA {s.ca_cert}")
    click.echo(f"               this machine: {s.node_cert} ({shown}; "
               f"until {cert.not_valid_after_utc:%Y-%m-%d})")  # fmt: skip


@click.command()
@click.option("--cluster", default=None, help="Cluster name [default: lab-<random>].")
@click.option("--tls", is_flag=True, help="Also create a CA and per-machine certificates.")
@click.option("--hosts", default=None, help="Comma-separated Macs to prepare, e.g. mac1,mac2.")
@click.option("--model-dir", "model_dirs", multiple=True,
              help="Model folder on every Mac (repeatable) [default: ~/models, "
                   "~/.cache/pomona/models].")  # fmt: skip
@click.option("--api-key", "with_api_key", is_flag=True, help="Also create an HTTP API key.")
@click.option("--force", is_flag=True, help="Replace an existing configuration (new secret).")
@click.option("--add", is_flag=True, help="Prepare more --hosts for the existing configuration.")
@click.option("--show", is_flag=True, help="Print the configuration without its secrets.")
@click.option("--config", "path", type=click.Path(path_type=Path), default=None,
              help="Configuration file [default: in this user's config folder].")  # fmt: skip
def init_command(
    cluster: str | None, tls: bool, hosts: str | None, model_dirs: tuple[str, ...],
    with_api_key: bool, force: bool, add: bool, show: bool, path: Path | None,
) -> None:  # fmt: skip
    """Create this cluster's secret (and certificates) to copy to each Mac."""
    import secrets as random

    path = path or default_config_path()
    host_list = _parse_hosts(hosts)
    try:
        if show:
            _show(path)
            return
        if add:
            if not host_list:
                raise click.UsageError("--add needs --hosts")
            config = load_cluster_config(path, home=Path("~"))
            ca = _read_ca(path.parent) if config.secrets.tls else None
        else:
            if path.exists() and not force:
                raise click.ClickException(
                    f"{path} already exists: pass --force to replace it (a new secret that "
                    "every Mac must get again), or --add --hosts ... to prepare more Macs"
                )
            name = check_cluster_name(cluster or f"lab-{random.token_hex(3)}")
            _forget_previous(path.parent)
            config = ClusterConfig(
                ClusterSecrets.generate(name),
                DEFAULT_COORDINATOR_PORT,
                DEFAULT_WORKER_PORT,
                tuple(Path(d) for d in model_dirs or DEFAULT_MODEL_DIRS),
                random.token_urlsafe(32) if with_api_key else None,
            )
            ca = create_ca(name) if tls else None
            if ca is not None:
                write_private(path.parent / "tls" / "ca-key.pem", ca[1])
            here = socket.gethostname().split(".")[0] or "localhost"
            _write_node(path, config, ca, here, ("localhost", "127.0.0.1", "::1"))
    except ClusterConfigError as e:
        raise click.ClickException(str(e)) from None
    for host in host_list:
        _write_node(_bundle(path, host) / CONFIG_FILE, config, ca, host)
    _report(path, config, ca is not None, host_list, add)


def _forget_previous(folder: Path) -> None:
    """Delete the files an earlier ``pomona init`` wrote here: they hold the old secret."""
    for bundle in folder.glob("hosts/*/pomona"):
        if (bundle / CONFIG_FILE).is_file():
            for name in (CONFIG_FILE, *TLS_FILES):
                (bundle / name).unlink(missing_ok=True)
            for empty in (bundle / "tls", bundle, bundle.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()
    for name in (*TLS_FILES, "tls/ca-key.pem"):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (folder / "tls").rmdir()


def _bundle(path: Path, host: str) -> Path:
    return path.parent / "hosts" / host.replace(":", "_") / "pomona"


def _read_ca(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "tls" / "ca.pem").read_bytes(), read_private(folder / "tls" / "ca-key.pem")


def _report(
    path: Path, config: ClusterConfig, tls: bool, hosts: tuple[str, ...], add: bool
) -> None:
    s = config.secrets
    if not add:
        click.echo(f'Cluster "{s.cluster}": wrote {path} (mode 0600).')
        if tls:
            ca = path.parent / "tls" / "ca.pem"
            click.echo(f"TLS: CA {ca}; its key ca-key.pem beside it never leaves this machine.")
    if hosts:
        click.echo("Copy to each Mac (one line per Mac; scp -p keeps the 0600 permissions):")
        for host in hosts:
            click.echo(_copy_line(_bundle(path, host), host))
    elif tls:
        config_arg = shlex.quote(str(path))
        click.echo(
            f"Certificates are for this machine only: prepare each Mac with "
            f"`pomona init --add --hosts mac1,mac2 --config {config_arg}`."
        )
    else:
        folder = shlex.quote(f"MAC:{MAC_CONFIG_PARENT}pomona/{CONFIG_FILE}")
        click.echo("Copy it to each Mac (replace MAC by its name):")
        click.echo(f"""  ssh MAC 'mkdir -p -m 700 "{MAC_CONFIG_PARENT}pomona"'""")
        click.echo(f"  scp -p {shlex.quote(str(path))} {folder}")
    click.echo(f"Then on each Mac, `pomona init --show` must print fingerprint {s.fingerprint}.")
