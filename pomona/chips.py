"""Apple Silicon chips: memory bandwidth and GPU core counts, as Apple publishes them.

The planner uses bandwidth to predict decode speed (decode reads every active weight
once per token) and GPU cores to predict prefill. Lookups take the chip name macOS
reports (`sysctl -n machdep.cpu.brand_string`, e.g. "Apple M2 Ultra"); a chip missing
from the table gives None: callers fall back to a measured or an explicitly assumed
figure, never a guessed one.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ChipVariant:
    """One binned configuration of a chip (Apple sells most chips in two)."""

    gpu_cores: int
    bandwidth_gbs: float


@dataclass(frozen=True)
class Chip:
    """A chip as macOS names it, with each variant Apple sells.

    `all_variants` is False where Apple has published figures for some variants only:
    then a GPU core count that is absent or matches none of them gives no variant.
    """

    name: str
    variants: tuple[ChipVariant, ...]
    all_variants: bool = True

    @property
    def gpu_core_counts(self) -> tuple[int, ...]:
        return tuple(v.gpu_cores for v in self.variants)

    def variant(self, gpu_cores: int | None = None) -> ChipVariant | None:
        """The variant with `gpu_cores`; unknown or absent -> the slowest (conservative),
        or None where not every variant is listed."""
        for v in self.variants:
            if v.gpu_cores == gpu_cores:
                return v
        if not self.all_variants:
            return None
        return min(self.variants, key=lambda v: (v.bandwidth_gbs, v.gpu_cores))

    def bandwidth_gbs(self, gpu_cores: int | None = None) -> float | None:
        variant = self.variant(gpu_cores)
        return None if variant is None else variant.bandwidth_gbs


def _chip(
    name: str,
    bandwidth: float | tuple[float, ...],
    cores: tuple[int, ...],
    *,
    all_variants: bool = True,
) -> Chip:
    bws = bandwidth if isinstance(bandwidth, tuple) else (bandwidth,) * len(cores)
    variants = tuple(ChipVariant(c, bw) for c, bw in zip(cores, bws, strict=True))
    return Chip(name, variants, all_variants)


# Bandwidth in GB/s; GPU core counts of the variants Apple sells. Where the variants
# differ in bandwidth (M3 Max, M4 Max) each has its own figure. M5 Pro and M5 Max: Apple's
# announcement (March 2026) gives only the top variant ("up to 20 GPU cores, 307 GB/s";
# "up to 40 GPU cores, 614 GB/s"; a real M5 Max reports gpu-core-count 40); their smaller
# variants' figures are not listed, so those read as unknown (n/a), never guessed.
CHIPS: tuple[Chip, ...] = (
    _chip("M1", 68.0, (7, 8)),
    _chip("M1 Pro", 200.0, (14, 16)),
    _chip("M1 Max", 400.0, (24, 32)),
    _chip("M1 Ultra", 800.0, (48, 64)),
    _chip("M2", 100.0, (8, 10)),
    _chip("M2 Pro", 200.0, (16, 19)),
    _chip("M2 Max", 400.0, (30, 38)),
    _chip("M2 Ultra", 800.0, (60, 76)),
    _chip("M3", 100.0, (8, 10)),
    _chip("M3 Pro", 150.0, (14, 18)),
    _chip("M3 Max", (300.0, 400.0), (30, 40)),
    _chip("M3 Ultra", 819.0, (60, 80)),
    _chip("M4", 120.0, (8, 10)),
    _chip("M4 Pro", 273.0, (16, 20)),
    _chip("M4 Max", (410.0, 546.0), (32, 40)),
    _chip("M5", 153.0, (10,)),
    _chip("M5 Pro", 307.0, (20,), all_variants=False),
    _chip("M5 Max", 614.0, (40,), all_variants=False),
)

_BY_KEY = {c.name.lower(): c for c in CHIPS}


def _key(name: str) -> str:
    key = re.sub(r"\s+", " ", name.strip()).lower()
    return key.removeprefix("apple ").strip()


def lookup_chip(name: str | None) -> Chip | None:
    """The chip named `name` ("Apple M4 Pro", "M4 Pro", any case); None when unknown."""
    if not name:
        return None
    return _BY_KEY.get(_key(name))


def chip_bandwidth_gbs(name: str | None, gpu_cores: int | None = None) -> float | None:
    """Published memory bandwidth of a chip; None for an unknown chip."""
    chip = lookup_chip(name)
    return None if chip is None else chip.bandwidth_gbs(gpu_cores)


def suggest_chip(name: str) -> str | None:
    """The known chip name closest to a misspelt one, for error messages."""
    matches = difflib.get_close_matches(_key(name), list(_BY_KEY), n=1, cutoff=0.6)
    return f"Apple {_BY_KEY[matches[0]].name}" if matches else None


def known_chip_names() -> list[str]:
    return [f"Apple {c.name}" for c in CHIPS]
