"""Finding workers: Bonjour browsing plus static seeds.

Every advert of ``_pomona._tcp.local.`` is resolved to ``host:port`` and
handed to a callback with its TXT properties; adverts of other clusters or of
another protocol version are dropped here, so the rest of the coordinator
never sees them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from pomona.config import PROTOCOL_VERSION, SERVICE_TYPE
from pomona.mdns import make_zeroconf

log = logging.getLogger(__name__)

Found = Callable[[str, dict[str, str]], Awaitable[None]]


def decode_properties(raw: dict[bytes, bytes | None]) -> dict[str, str]:
    return {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in raw.items()}


def accept(props: dict[str, str], cluster: str) -> str:
    """Why an advert is ignored, or "" to use it."""
    if props.get("cluster") != cluster:
        return f"it belongs to cluster {props.get('cluster')!r}, not {cluster!r}"
    if props.get("protocol") != str(PROTOCOL_VERSION):
        return f"it speaks protocol {props.get('protocol')!r}, not {PROTOCOL_VERSION}"
    if not props.get("node_id"):
        return "it carries no node id"
    return ""


class Browser:
    """Browses Bonjour for workers of one cluster."""

    def __init__(self, cluster: str, interfaces: tuple[str, ...], on_found: Found):
        self.cluster = cluster
        self.interfaces = interfaces
        self.on_found = on_found
        self._tasks: set[asyncio.Task[None]] = set()
        self._ignored: set[str] = set()

    async def __aenter__(self) -> Browser:
        self._zc = make_zeroconf(self.interfaces)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._browser.async_cancel()
        await self._zc.async_close()
        for task in list(self._tasks):
            task.cancel()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, 3000):
            log.debug("could not resolve %s", name)
            return
        props = decode_properties(info.properties)
        reason = accept(props, self.cluster)
        if reason:
            if name not in self._ignored:
                log.info("ignoring worker %s: %s", name, reason)
                self._ignored.add(name)
            return
        addresses = [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4]
        if not addresses or info.port is None:
            return
        await self.on_found(f"{addresses[0]}:{info.port}", props)
