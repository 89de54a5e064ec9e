"""What an installed wheel carries: it works with no source checkout beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a fresh clone holds: no venv, caches or build output of this checkout.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(source)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    (wheel,) = dist.glob("pomona-*.whl")
    return wheel


def test_plan_finds_bundled_configs_from_an_installed_wheel(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
        + [str(wheel)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"  # no checkout here or above that pomona could find
    elsewhere.mkdir()
    (elsewhere / "nodes.json").write_text(
        json.dumps([{"name": "studio", "chip": "Apple M3 Ultra", "memory_gb": 256}])
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import pomona.coordinator.plan_cli as m; print(m.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert where.startswith(str(target)), f"the wheel was not the pomona imported: {where}"
    done = subprocess.run(
        [sys.executable, "-m", "pomona", "plan", "llama-3.1-70b", "--nodes", "nodes.json"]
        + ["--bits", "4", "--json"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["model"]["name"] == "llama-3.1-70b-4bit"
    assert plan["model"]["num_layers"] == 80
