"""The worker and coordinator packages depend only on the shared core, never on each other."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import pomona.coordinator
import pomona.worker

_PACKAGES = {"pomona.worker": pomona.worker, "pomona.coordinator": pomona.coordinator}


def _modules(package: str) -> list[str]:
    path = _PACKAGES[package].__path__
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]


def _imported_after(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [(m, "pomona.coordinator") for m in _modules("pomona.worker")]
    + [(m, "pomona.worker") for m in _modules("pomona.coordinator")],
)
def test_package_does_not_import_the_other(module: str, forbidden: str) -> None:
    loaded = _imported_after(module)
    crossing = [m for m in loaded if m == forbidden or m.startswith(forbidden + ".")]
    assert not crossing, f"importing {module} loads {crossing}"
