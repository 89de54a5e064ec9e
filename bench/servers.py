"""The two HTTP servers the concurrency benchmark loads, pinned one core per rank.

- ``PomonaHttp``: the decode benchmark's Pomona (local workers under
  ``taskset``, a coordinator, the cluster secret from ``pomona init``) with the
  coordinator's OpenAI-compatible API switched on.
- ``MlxLmServer``: ``mlx_lm.server --pipeline`` under ``mlx.launch --backend
  ring -n 2``. ``mlx.launch`` runs ``<--python> <args>`` in each rank, so
  ``--python`` names a two-line shell script that execs the venv's python
  under ``taskset -c $MLX_RANK``: the rank (its MLX threads and, on rank 0,
  its HTTP threads) never leaves its core. The script runs ``mlx_lm`` through
  ``in_own_session.py``, so each rank has a process session (on Linux, a
  scheduler autogroup) of its own, as each Pomona runner has.

Both answer ``url``; ``pause``/``resume`` keep an idle system off the cores
while the other is measured.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from systems import LOOPBACK, Pomona, Proc, Processes, free_ports, pinned


def http_ok(url: str) -> bool:
    """Whether GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class PomonaHttp(Pomona):
    """Pomona with its OpenAI-compatible HTTP API on a free port."""

    def __init__(self, name: str, workers: int, layers: str, max_batch: int):
        super().__init__(name, workers, layers)
        self.max_batch = max_batch
        self.http_port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self, processes: Processes, model: Path, prompt: Any = ()) -> None:
        self.http_port = free_ports(1)
        super().start(processes, model, prompt)

    def coordinator_options(self) -> list[str]:
        """systems.Pomona's, with the HTTP API on and the throughput objective."""
        return [
            "--objective", "throughput", "--layers", self.layers,
            "--max-batch", str(self.max_batch), "--http-port", str(self.http_port),
        ]  # fmt: skip

    def ready(self) -> bool:
        return super().ready() and http_ok(f"{self.url}/health")

    @property
    def rank_pids(self) -> list[int]:
        return [pid for label, pid in sorted(self.pids.items()) if label.endswith(" runner")]


class MlxLmServer:
    """``mlx_lm.server --pipeline`` on ``ranks`` ranks of ``mlx.launch``."""

    def __init__(self, name: str, ranks: int, decode_concurrency: int, launcher_running: bool):
        self.name = name
        self.ranks = ranks
        self.decode_concurrency = decode_concurrency
        self.launcher_running = launcher_running
        self.procs: list[Proc] = []
        self.commands: list[list[str]] = []
        self.affinity: dict[int, list[int]] = {}
        self.pids: dict[str, int] = {}
        self.rank_pids: list[int] = []
        self.http_port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self, processes: Processes, model: Path) -> None:
        python = processes.log_dir / "python-pinned-to-rank"
        pin = pinned([0])  # ["taskset", "-c", "0"], or [] without taskset
        prefix = f'taskset -c "$((MLX_RANK % {os.cpu_count() or 1}))" ' if pin else ""
        session = shlex.quote(str(Path(__file__).with_name("in_own_session.py")))
        python.write_text(f'#!/bin/sh\nexec {prefix}{shlex.quote(sys.executable)} {session} "$@"\n')
        python.chmod(0o755)
        self.http_port = free_ports(1)
        launcher = Path(sys.executable).with_name("mlx.launch")
        self.commands = [[
            str(launcher if launcher.exists() else shutil.which("mlx.launch") or "mlx.launch"),
            "--backend", "ring", "-n", str(self.ranks),
            "--starting-port", str(free_ports(self.ranks)), "--python", str(python),
            # "--" ends mlx.launch's options: its --hosts would swallow a --host.
            "--", "-m", "mlx_lm", "server", "--model", str(model), "--pipeline",
            "--port", str(self.http_port), "--log-level", "WARNING",
            "--decode-concurrency", str(self.decode_concurrency),
        ]]  # fmt: skip
        # mlx.launch relays its stdin to the ranks; /dev/null would make its
        # select() loop spin, so it gets a pipe that never delivers anything.
        self.procs = [processes.spawn("mlx-lm-server", self.commands[0], stdin=subprocess.PIPE)]

    def ready(self) -> bool:
        import psutil

        if not http_ok(f"{self.url}/health"):
            return False
        launcher = psutil.Process(self.procs[0].popen.pid)
        ranks: dict[int, psutil.Process] = {}
        for child in launcher.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "mlx_lm" in child.cmdline():
                    ranks[int(child.environ().get("MLX_RANK", "-1"))] = child
        if sorted(ranks) != list(range(self.ranks)):
            return False
        self.rank_pids = [ranks[r].pid for r in sorted(ranks)]
        self.affinity = {r: sorted(p.cpu_affinity() or []) for r, p in ranks.items()}
        self.pids = {f"rank {r}": p.pid for r, p in sorted(ranks.items())}
        self.pids["mlx.launch"] = launcher.pid
        return True

    def _signal(self, sig: int, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """Stop the ranks and the launcher while the other system is measured.

        An idle mlx_lm.server is not idle: rank 0 polls its queue every 0.1 s
        and every rank then enters an all_sum, where the ring backend spins.
        """
        self._signal(signal.SIGSTOP, [self.procs[0].popen.pid, *self.rank_pids])

    def resume(self) -> None:
        """Let the ranks run; the launcher too if it is measured as launched.

        mlx.launch's relay threads select() on the ranks' always-writable
        stdin pipes, so a running launcher keeps most of a core busy.
        """
        launcher = [self.procs[0].popen.pid] if self.launcher_running else []
        self._signal(signal.SIGCONT, [*self.rank_pids, *launcher])

    def stop(self) -> None:
        """Let every process run again, so that it can take its SIGTERM."""
        self._signal(signal.SIGCONT, [self.procs[0].popen.pid, *self.rank_pids])
