"""The README's demo: a 2-worker local cluster on the built-in model.

Starts ``pomona up --local 2``, waits for its ready line, generates text with
``pomona generate`` exactly as a person would, then stops the cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(preferred: int) -> str:
    """``preferred`` when nothing listens there, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return str(s.getsockname()[1])
    raise SystemExit("no free port on loopback")


PORT = os.environ.get("POMONA_DEMO_PORT") or free_port(50150)
HTTP_PORT = free_port(8080)
PROMPTS = ["The lab has four machines", "Once upon a time"]


def main() -> int:
    pomona = shutil.which("pomona", path=str(BIN)) or "pomona"
    print(f"$ pomona up --local 2 --port {PORT} --http-port {HTTP_PORT}", flush=True)
    up = subprocess.Popen(
        [pomona, "up", "--local", "2", "--port", PORT, "--http-port", HTTP_PORT],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        if not line:
            print("the cluster did not start (see the messages above)", file=sys.stderr)
            return 1
        print(line.rstrip(), flush=True)
        env = dict(os.environ, POMONA_COORDINATOR=f"127.0.0.1:{PORT}")
        commands = [[pomona, "nodes"]]
        commands += [[pomona, "generate", p, "--max-tokens", "48"] for p in PROMPTS]
        for cmd in commands:
            shown = " ".join(c if " " not in c else repr(c) for c in ["pomona", *cmd[1:]])
            print("\n$ " + shown, flush=True)
            start = time.monotonic()
            if subprocess.run(cmd, env=env).returncode != 0:
                return 1
            if cmd[1] == "generate":
                print(f"({time.monotonic() - start:.1f} s)", flush=True)
        print("\nKeep a cluster running with: pomona up --local 2", flush=True)
        return 0
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
