"""The CLI as a person uses it: one clear line and a non-zero exit on mistakes."""

from __future__ import annotations

import plistlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pomona.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pomona", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_unreachable_coordinator_is_one_line_and_non_zero() -> None:
    result = run("generate", "hello", "--coordinator", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach 127.0.0.1:1")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_coordinator_address_comes_from_the_environment() -> None:
    import os

    env = dict(os.environ, POMONA_COORDINATOR="127.0.0.1:2")
    result = run("nodes", env=env)
    assert result.returncode == 1
    assert "127.0.0.1:2" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "hi", "--coordinator", "nonsense"], "is not HOST:PORT"),
        (["coordinator", "--worker", "host-without-port"], "is not HOST:PORT"),
        (["coordinator", "--layers", "3,x"], "layers per worker"),
        (["up", "--local", "0"], "0 is not in the range"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args: list[str], words: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert words in result.output


def test_deploy_files_start_the_worker() -> None:
    plist = plistlib.loads((ROOT / "deploy/launchd/org.pomona.worker.plist").read_bytes())
    assert plist["ProgramArguments"][1] == "worker"
    unit = (ROOT / "deploy/systemd/pomona-worker.service").read_text()
    assert "ExecStart=" in unit and "pomona worker" in unit
