"""``pomona up --local N``: a whole cluster as processes on this machine.

Workers and the coordinator are separate processes on loopback that find each
other through Bonjour, as real machines do. Every child runs in its own
process group and is stopped on Ctrl-C or SIGTERM; on Linux a child also dies
if this process is killed outright. Nothing else ends ``up`` but the
coordinator's death: not a worker's, and not a reader of its output going away.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO, cast

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)

from pomona import rpc
from pomona.credentials import local_config_path
from pomona.display import shard_state
from pomona.orphans import die_with_parent
from pomona.security import Auth, write_local_config
from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

LOOPBACK = "127.0.0.1"
# A child's log grows across runs of `pomona up` up to this, then starts anew
# (the previous one kept as NAME.log.1).
LOG_MAX_BYTES = 8 << 20
# Problems the cluster does not get over by waiting.
FATAL = ("unknown model", "cannot", "the checkpoint")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# Below the kernel's ephemeral range (32768+ on Linux, 49152+ on macOS), so
# a port chosen now is not taken by some outgoing connection before the
# worker's runner binds it seconds later.
PORT_RANGE = (20000, 32000)


def free_ports(taken: set[int], count: int) -> int:
    """A port p with p .. p + count - 1 free, now marked ``taken``."""
    for _ in range(500):
        port = random.randrange(*PORT_RANGE)
        block = set(range(port, port + count))
        if block & taken or not all(_port_free(p) for p in block):
            continue
        taken.update(block)
        return port
    raise RuntimeError(f"no {count} free ports in a row on loopback")


def free_port_pair(taken: set[int]) -> int:
    """A port p with p and p + 1 free (the coordinator's gRPC port and a spare)."""
    return free_ports(taken, 2)


def free_worker_ports(taken: set[int]) -> int:
    """A worker's port p: p (gRPC), p + 1 (the MLX ring) and p + 2 (a head runner) free."""
    return free_ports(taken, 3)


class Unread(io.TextIOBase):
    """``stream``, but a write nobody can read any more is dropped, not raised.

    ``up`` reports on stdout and stderr while it supervises the cluster, and
    its reader may go away (``| head``, a harness that stopped reading, a
    closed terminal). A failed write would end ``up`` and so stop the whole
    cluster (rich even exits on a broken pipe), silently, as stderr is gone.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def write(self, text: str) -> int:
        try:
            self._stream.write(text)
        except OSError:
            self._to_devnull()
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Point the stream's file at /dev/null, so that what it still buffers (and
        what Python flushes at exit) goes somewhere."""
        with contextlib.suppress(OSError, ValueError):  # no file (a test's stream)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)


def _workers(count: int) -> str:
    return f"{count} worker{'' if count == 1 else 's'}"


class LocalCluster:
    def __init__(
        self,
        count: int,
        model: str,
        port: int,
        layers: str | None,
        state_dir: Path,
        http_port: int = 0,
        chat_template: Path | None = None,
        backend: str = "auto",
        prompt_cache_gb: float | None = None,
        parallel: str = "auto",
        draft_model: str = "",
        num_draft_tokens: int = 4,
    ):
        self.prompt_cache_gb = prompt_cache_gb
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.count = count
        self.http_port = http_port
        self.model = model
        self.port = port
        self.layers = layers
        self.chat_template = chat_template
        self.backend = backend
        self.parallel = parallel
        self.state_dir = state_dir
        self.cluster = f"local-{secrets.token_hex(3)}"
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.node_names = {f"worker-{i}": f"local-{i}" for i in range(1, count + 1)}
        self.out = Unread(sys.stdout)
        self.console = Console(file=cast(TextIO, Unread(sys.stderr)))
        self._stop = ""  # the name of the signal that asked to stop
        self.config: Path | None = None

    def _spawn(self, name: str, args: list[str]) -> None:
        log_dir = self.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        if log_path.exists() and log_path.stat().st_size > LOG_MAX_BYTES:
            log_path.replace(log_path.with_suffix(".log.1"))
        log = log_path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pomona", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        )
        log.close()
        self.children.append((name, proc, log_path))

    def start(self) -> None:
        self.config = write_local_config(local_config_path().parent, self.cluster, self.port)
        if not _port_free(self.port):
            raise RuntimeError(f"port {self.port} is in use: pass --port with a free port")
        if self.http_port and not _port_free(self.http_port):
            raise RuntimeError(
                f"port {self.http_port} is in use: pass --http-port with a free port (0: no HTTP)"
            )
        taken = {self.port, self.http_port}
        for i in range(self.count):
            port = free_worker_ports(taken)
            name = f"worker-{i + 1}"
            self._spawn(
                name,
                [
                    "worker", "--port", str(port), "--host", LOOPBACK,
                    "--name", self.node_names[name], "--cluster", self.cluster,
                    "--address", LOOPBACK, "--mdns-interface", LOOPBACK,
                    "--state-dir", str(self.state_dir / name),
                    "--config", str(self.config), *self._model_dir_args(),
                ],
            )  # fmt: skip
        args = [
            "coordinator", "--port", str(self.port), "--host", LOOPBACK, "--model", self.model,
            "--cluster", self.cluster, "--min-workers", str(self.count),
            "--mdns-interface", LOOPBACK, "--objective", "throughput",
            "--http-port", str(self.http_port),
            "--state-dir", str(self.state_dir / "coordinator"),
            "--config", str(self.config), "--backend", self.backend, *self._model_dir_args(),
            "--parallel", self.parallel,
        ]  # fmt: skip
        if self.layers:
            args += ["--layers", self.layers]
        if self.chat_template is not None:
            args += ["--chat-template", str(self.chat_template)]
        if self.prompt_cache_gb is not None:
            args += ["--prompt-cache-gb", f"{self.prompt_cache_gb:g}"]
        if self.draft_model:
            args += ["--draft-model", self.draft_model]
            args += ["--num-draft-tokens", str(self.num_draft_tokens)]
        self._spawn("coordinator", args)

    def _model_dir_args(self) -> list[str]:
        """A model (or draft) given as a folder is found in its parent folder."""
        args: list[str] = []
        for model in (self.model, self.draft_model):
            path = Path(model).expanduser()
            parent = str(path.resolve().parent)
            if model and path.is_dir() and parent not in args:
                args += ["--model-dir", parent]
        return args

    def _dead_child(self, among: str = "") -> str:
        for name, proc, log_path in self.children:
            if name.startswith(among) and proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                return f"{name} exited with code {proc.returncode}: " + " | ".join(tail)
        return ""

    def _follow(self) -> int:
        """While up: report workers that die and how the cluster re-forms.

        A worker that dies is not restarted: this is where people try the
        self-healing, and a restart would hide it (on real Macs, launchd or
        systemd restarts the daemon). The cluster serves on the rest; only
        the coordinator's death ends ``up``.
        """
        assert self.config is not None
        stub = coordinator_pb2_grpc.CoordinatorStub(
            rpc.channel(f"{LOOPBACK}:{self.port}", Auth.load(self.config))
        )
        gone: set[str] = set()
        shown = ""
        while not self._stop:
            if dead := self._dead_child("coordinator"):
                self.console.print(f"[red]error:[/red] {dead}")
                return 1
            for name, proc, _ in self.children:
                if name.startswith("worker") and proc.poll() is not None and name not in gone:
                    gone.add(name)
                    self.console.print(
                        f"[yellow]{name} (node {self.node_names[name]}) exited with "
                        f"code {proc.returncode}{_signal_name(proc.returncode)}[/yellow]; the "
                        "coordinator re-forms the pipeline on the "
                        f"{_workers(self.count - len(gone))} left (it is not restarted)",
                        soft_wrap=True,
                    )
            if gone:
                try:
                    reply = stub.Status(coordinator_pb2.StatusRequest(), timeout=2.0)
                except grpc.RpcError:
                    reply = None
                if reply is not None:
                    line = _layout(reply)
                    if line != shown:
                        self.console.print(line, soft_wrap=True, markup=False)
                        shown = line
            time.sleep(0.5)
        return 0

    def wait_ready(self, timeout: float) -> coordinator_pb2.StatusReply:
        """Wait for the cluster to serve, with a progress bar per worker."""
        assert self.config is not None
        address = f"{LOOPBACK}:{self.port}"
        stub = coordinator_pb2_grpc.CoordinatorStub(rpc.channel(address, Auth.load(self.config)))
        deadline = time.monotonic() + timeout
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            console=self.console,
            transient=True,
        )
        bars: dict[str, TaskID] = {}
        overall = progress.add_task("starting workers and coordinator", total=None)
        with progress:
            while time.monotonic() < deadline and not self._stop:
                if dead := self._dead_child():
                    raise RuntimeError(dead)
                try:
                    reply = stub.Status(coordinator_pb2.StatusRequest(), timeout=2.0)
                except grpc.RpcError:
                    time.sleep(0.2)
                    continue
                if reply.serving:
                    return reply
                if reply.problem.startswith(FATAL) or "does not fit" in reply.problem:
                    raise RuntimeError(reply.problem)
                progress.update(overall, description=reply.problem or "planning")
                for n in reply.nodes:
                    shard = n.sample.shard
                    if not shard.load_id:
                        continue
                    if n.node.name not in bars:
                        bars[n.node.name] = progress.add_task("", total=1.0)
                    progress.update(
                        bars[n.node.name],
                        completed=shard.progress,
                        description=f"{n.node.name} layers {shard.start_layer}-"
                        f"{shard.end_layer - 1} {shard_state(shard.state)}",
                    )
                time.sleep(0.2)
        if self._stop:
            return coordinator_pb2.StatusReply()  # stopped while waiting: run() says so
        raise RuntimeError(f"the cluster was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        """Coordinator first (it unloads the workers), then the workers."""
        for _, proc, _ in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def run(self, timeout: float) -> int:
        def on_signal(signum: int, frame: object) -> None:
            self._stop = signal.Signals(signum).name

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            self.start()
            reply = self.wait_ready(timeout)
            if self._stop:
                return 130
            http = f", OpenAI API http://{LOOPBACK}:{self.http_port}/v1" if self.http_port else ""
            print(
                f"Pomona is up: coordinator {LOOPBACK}:{self.port}{http}, {len(reply.nodes)} "
                f'workers, model {reply.model} (try: pomona generate "Once upon a time"; '
                "Ctrl-C stops)",
                file=self.out,
                flush=True,
            )
            return self._follow()
        except RuntimeError as e:
            self.console.print(f"[red]error:[/red] {e} (logs in {self.state_dir / 'logs'})")
            return 1
        finally:
            if self._stop:
                self.console.print(f"{self._stop}: stopping the coordinator and the workers")
            self.stop()
            if self.config is not None:
                self.config.unlink(missing_ok=True)


def _signal_name(returncode: int) -> str:
    """The signal that killed a process, as " (SIGKILL)", from its negative return code."""
    if returncode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-returncode).name})"
    except ValueError:
        return ""


def _layout(reply: coordinator_pb2.StatusReply) -> str:
    """One line: where the layers are now, or why none serve."""
    if not reply.serving:
        return f"not serving: {reply.problem}"
    where = ", ".join(f"{p.name} layers {p.start_layer}-{p.end_layer - 1}" for p in reply.plan)
    return f"serving on {_workers(len(reply.plan))}: {where}"
