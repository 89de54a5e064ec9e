"""Advertising a worker over Bonjour (``_pomona._tcp.local.``)."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from zeroconf import ServiceInfo

from pomona.config import SERVICE_TYPE


def service_info(
    name: str, addresses: list[str], port: int, properties: Mapping[str, str]
) -> ServiceInfo:
    """The worker's advert. TXT records carry nothing secret."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:50] or "worker"
    return ServiceInfo(
        SERVICE_TYPE,
        f"{safe}-{properties['node_id'][:8]}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in addresses],
        port=port,
        properties=dict(properties),
        server=f"{safe}-{properties['node_id'][:8]}.local.",
    )
