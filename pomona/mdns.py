"""The zeroconf instance both sides of Bonjour use: workers advertise, the coordinator browses."""

from __future__ import annotations

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf


def make_zeroconf(interfaces: tuple[str, ...]) -> AsyncZeroconf:
    """IPv4 mDNS on `interfaces`, or on every interface when none is given."""
    if interfaces:
        return AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    return AsyncZeroconf(ip_version=IPVersion.V4Only)
