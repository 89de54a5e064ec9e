"""Human-readable quantities for messages and tables."""

from __future__ import annotations

GIB = 2**30


def format_bytes(n: float) -> str:
    """1.5 GiB, 820 MiB, 12 KiB: binary units, as RAM is sized (a "64 GB" Mac has 64 GiB)."""
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
