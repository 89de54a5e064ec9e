"""Which coordinator a worker serves: a lease, renewed by that coordinator's heartbeats.

Two coordinators of one cluster (a second one started by mistake, or an old
one that came back) must never both load and unload the same workers: each
would tear down the other's pipeline. A worker is held by the coordinator that
watches it (its telemetry stream renews the lease) or loaded it; any other is
refused Load and Unload until the lease lapses, ``ttl`` seconds after the
holder's last heartbeat, or at once when the holder's stream closes (a
coordinator that exits or is killed closes its connections).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Lease:
    ttl: float = 10.0
    holder: str = ""
    renewed: float = 0.0

    def live_holder(self, now: float | None = None) -> str:
        """The coordinator holding the lease now ("" when none does)."""
        now = time.monotonic() if now is None else now
        return self.holder if self.holder and now - self.renewed < self.ttl else ""

    def claim(self, who: str, now: float | None = None) -> str:
        """Take or renew the lease for ``who``; returns the other holder if refused.

        A caller that gives no name never takes the lease, and is refused
        only while a coordinator holds it.
        """
        now = time.monotonic() if now is None else now
        holder = self.live_holder(now)
        if holder and holder != who:
            return holder
        if who:
            self.holder, self.renewed = who, now
        return ""

    def release(self, who: str) -> None:
        """``who`` stopped watching (its stream closed): the lease is free at once."""
        if who and self.holder == who:
            self.holder, self.renewed = "", 0.0
