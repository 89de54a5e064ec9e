"""Human-readable quantities for messages and tables."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """1.5 GB, 820 MB, 12 KB: decimal units, as Apple and disk makers count."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if abs(n) < 10 * size else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"
