"""The measured links between workers, as `pomona nodes` and `pomona status` print them."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text

from pomona.v1 import coordinator_pb2


def link_rate(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    return f"{bits / 1e9:.2f} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.0f} Mbit/s"


def link_line(link: coordinator_pb2.LinkMeasurement) -> str:
    """``w0 -> w1 at 198.19.0.2 (thunderbolt0, thunderbolt): 0.21 ms RTT, 940 Mbit/s, ring``"""
    where = ", ".join(x for x in (link.interface, link.kind) if x) or "?"
    head = f"{link.from_name} -> {link.to_name} at {link.address} ({where})"
    if link.error:
        return f"{head}: {link.error}"
    ring = ", ring" if link.in_ring else ""
    return f"{head}: {link.rtt_ms:.2f} ms RTT, {link_rate(link.bandwidth_bytes_per_s)}{ring}"


def link_lines(links: Iterable[coordinator_pb2.LinkMeasurement]) -> list[Text]:
    """A heading and one line per probe; nothing when no link was measured."""
    links = list(links)
    if not links:
        return []
    lines = [Text("links (measured from -> to; the ring uses those marked ring):", style="bold")]
    for link in links:
        style = "red" if link.error else ("green" if link.in_ring else "")
        lines.append(Text("  " + link_line(link), style=style))
    return lines
