"""The three systems the decode benchmark compares, behind one interface.

Each system is started as real processes, pinned one core per rank, and then
answers ``request(max_tokens)`` with the greedy tokens of one request and the
time each arrived. Every process runs in its own process group, and
``Processes.stop_all`` kills those groups, so nothing outlives the benchmark.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"
# The longest an mlx-lm process may take to answer one request (seconds).
REQUEST_TIMEOUT = 900.0
RANK_SCRIPT = Path(__file__).resolve().with_name("mlx_lm_rank.py")
NO_PIN = "POMONA_BENCH_NO_PIN"


@dataclass(frozen=True)
class Run:
    """One request: its tokens and when each arrived (seconds)."""

    tokens: tuple[int, ...]
    stamps: tuple[float, ...]
    cached_tokens: int = 0  # prompt tokens Pomona's prefix cache restored

    @property
    def ttft_s(self) -> float:
        """From sending the request to the first token."""
        return self.stamps[0] if self.stamps else float("nan")

    @property
    def decode_seconds(self) -> float:
        return self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else 0.0

    @property
    def tps(self) -> float:
        """Decode tokens/s: first token to last, over tokens - 1."""
        seconds = self.decode_seconds
        return (len(self.tokens) - 1) / seconds if seconds > 0 else 0.0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end a benchmark as Ctrl-C does: every process it started stops."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


def halves(model: Path) -> str:
    """Pomona's ``--layers`` for two workers: the model's layers as even as they go."""
    n = int(json.loads((model / "config.json").read_text())["num_hidden_layers"])
    return f"{n - n // 2},{n // 2}"


# -- processes ----------------------------------------------------------------


def pinned(cores: Sequence[int] | None) -> list[str]:
    """A ``taskset`` prefix pinning a command to ``cores`` (none where unavailable).

    ``POMONA_BENCH_NO_PIN=1`` (``--no-pin`` of the benchmarks) pins nothing: on a
    GPU machine the ranks drive an accelerator and one core each would measure the
    host, not the system.
    """
    if (
        cores is None
        or os.environ.get(NO_PIN) == "1"
        or not hasattr(os, "sched_setaffinity")
        or shutil.which("taskset") is None
    ):
        return []
    return ["taskset", "-c", ",".join(str(c) for c in cores)]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Processes:
    """Every process the benchmark starts, each in its own process group."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    extra_pids: set[int] = field(default_factory=set)

    def spawn(self, name: str, argv: list[str], *, stdin: int | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        self.stop(list(self.procs), set(self.extra_pids))

    def stop(self, procs: list[Proc], extra_pids: set[int]) -> None:
        """SIGTERM ``procs``' groups, SIGKILL what is left after 10 s, then kill
        ``extra_pids`` and their groups; none of them is stopped again later."""
        for proc in reversed(procs):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
        # Pomona's runners and the mlx-lm processes lead sessions of their own.
        for pid in extra_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.procs = [p for p in self.procs if p not in procs]
        self.extra_pids -= extra_pids

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{p.tail()}" for p in self.procs)

    @contextlib.contextmanager
    def measuring(self, keep_logs: bool, stop: Callable[[], None]) -> Iterator[None]:
        """Run a measurement; however it ends, ``stop``, stop every process.

        Ctrl-C exits with 130; a failure prints each process's log tail. The
        logs are kept when asked or when the run failed, removed otherwise.
        """
        failed = False
        try:
            yield
        except KeyboardInterrupt:
            failed = True
            print("\ninterrupted; stopping every process", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception:
            failed = True
            print(self.logs(), file=sys.stderr)
            raise
        finally:
            stop()
            self.stop_all()
            if keep_logs or failed:
                print(f"logs: {self.log_dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.log_dir, ignore_errors=True)


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, as the reports print them."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_info(
    script: str, started: float, model_desc: str, load_before: str, **extra: Any
) -> dict[str, Any]:
    """What a benchmark records about its run: when, where, with what, how long."""
    from importlib.metadata import version

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "model_desc": model_desc,
        **extra,
        "load_before": load_before,
        "load_after": load_average(),
        "command": shlex.join(["python", f"bench/{script}", *sys.argv[1:]]),
        "seconds": round(time.monotonic() - started, 1),
    }


_HANDED_OUT: set[int] = set()  # ports given to a process of this run, maybe not bound yet


def free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 free on loopback (and not handed out before)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            base = s.getsockname()[1]
        if base + count > 65535 or _HANDED_OUT.intersection(range(base, base + count)):
            continue
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind((LOOPBACK, p))
        except OSError:
            continue
        _HANDED_OUT.update(range(base, base + count))
        return base
    raise RuntimeError("no free run of ports on loopback")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (all its threads)."""
    import psutil

    seconds = {}
    for label, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[label] = times.user + times.system
    return seconds


def wait_for(what: str, check: Callable[[], Any], timeout: float, procs: Sequence[Proc]) -> Any:
    """Poll ``check`` until it returns a truthy value; fail early if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited while waiting for {what}:\n{dead[0].tail()}")
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- the control socket of the mlx-lm processes -------------------------------


class ControlServer:
    """Where mlx-lm processes report ready and take requests, one line each way."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.address = f"{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.ranks: dict[str, dict[int, tuple[IO[str], dict[str, Any]]]] = {}

    def poll(self) -> None:
        """Accept whatever connections are waiting."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, BlockingIOError):
                return
            conn.settimeout(REQUEST_TIMEOUT)  # a stuck rank fails the run, not hangs it
            stream = conn.makefile("rw")
            hello = json.loads(stream.readline())
            self.ranks.setdefault(hello["system"], {})[hello["rank"]] = (stream, hello)

    def close(self) -> None:
        for ranks in self.ranks.values():
            for stream, _ in ranks.values():
                with contextlib.suppress(OSError):
                    stream.close()
        self.sock.close()


# -- the systems -------------------------------------------------------------


class MlxLm:
    """Single-process mlx-lm, or mlx-lm's own pipeline under ``mlx.launch``."""

    def __init__(self, name: str, ranks: int, control: ControlServer):
        self.name = name
        self.ranks = ranks
        self.control = control
        self.procs: list[Proc] = []
        self.commands: list[list[str]] = []
        self.affinity: dict[int, list[int]] = {}
        self.pids: dict[str, int] = {}
        self.processes: Processes | None = None

    def start(self, processes: Processes, model: Path, prompt: Sequence[int]) -> None:
        self.processes = processes
        script = [
            str(RANK_SCRIPT), "--model", str(model), "--prompt-tokens",
            ",".join(map(str, prompt)), "--control", self.control.address, "--system", self.name,
        ]  # fmt: skip
        if self.ranks == 1:
            self.commands = [[sys.executable, *script]]
            self.procs = [processes.spawn("mlx-lm-single", self.commands[0])]
            return
        launcher = Path(sys.executable).with_name("mlx.launch")
        self.commands = [[
            str(launcher if launcher.exists() else "mlx.launch"),
            "--backend", "ring", "-n", str(self.ranks), "--starting-port",
            str(free_ports(self.ranks)), "--python", sys.executable, *script, "--pipeline",
        ]]  # fmt: skip
        # mlx.launch relays its own stdin to the ranks; /dev/null would make its
        # select() loop spin, so it gets a pipe that never delivers anything.
        self.procs = [processes.spawn("mlx-lm-pipeline", self.commands[0], stdin=subprocess.PIPE)]

    def ready(self) -> bool:
        self.control.poll()
        ranks = self.control.ranks.get(self.name, {})
        if len(ranks) < self.ranks:
            return False
        self.affinity = {r: hello["affinity"] for r, (_, hello) in ranks.items()}
        self.pids = {f"rank {r}": hello["pid"] for r, (_, hello) in sorted(ranks.items())}
        if self.processes is not None:  # each rank leads a session of its own
            self.processes.extra_pids.update(self.pids.values())
        if self.ranks > 1:
            self.pids["mlx.launch"] = self.procs[0].popen.pid
        self.pids["client (this script)"] = os.getpid()
        return True

    def pause(self) -> None:
        """Stop mlx.launch (not its ranks) while other systems are measured.

        Its I/O relay loop polls always-writable pipes and so keeps a core
        partly busy; paused, it cannot steal CPU from another system's ranks.
        """
        if self.ranks > 1:
            os.kill(self.procs[0].popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.ranks > 1:
            os.kill(self.procs[0].popen.pid, signal.SIGCONT)

    def request(self, max_tokens: int) -> Run:
        ranks = self.control.ranks[self.name]
        for stream, _ in ranks.values():
            stream.write(json.dumps({"max_tokens": max_tokens}) + "\n")
            stream.flush()
        replies = {rank: stream.readline() for rank, (stream, _) in ranks.items()}
        if not all(replies.values()):
            raise RuntimeError(f"{self.name}: a rank closed its control connection")
        run = json.loads(replies[0])
        return Run(tuple(run["tokens"]), tuple(run["stamps"]))

    def stop(self) -> None:
        self.resume()
        for stream, _ in self.control.ranks.get(self.name, {}).values():
            with contextlib.suppress(OSError):
                stream.write(json.dumps({"exit": True}) + "\n")
                stream.flush()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(15)


class Pomona:
    """Pomona: pinned local workers, a coordinator, requests over gRPC."""

    def __init__(
        self, name: str, workers: int, layers: str, options: Sequence[str] = (), tag: str = ""
    ):
        self.name = name
        self.workers = workers
        self.layers = layers
        # Extra coordinator options; a tag keeps several Pomona clusters of one run apart.
        self.options = list(options)
        self.tag = tag
        self.procs: list[Proc] = []
        self.commands: list[list[str]] = []
        self.affinity: dict[int, list[int]] = {}
        self.pids: dict[str, int] = {}
        self.address = ""
        self.problem = ""
        self.prompt: list[int] = []
        self.config = Path()
        self.processes: Processes | None = None
        self.last_usage: Any = None  # the Usage of the last request
        self._stub: Any = None

    def start(self, processes: Processes, model: Path, prompt: Sequence[int]) -> None:
        self.prompt = list(prompt)
        self.processes = processes
        cluster = f"bench-{os.getpid()}{self.tag}"
        pomona = [sys.executable, "-m", "pomona"]
        # The cluster secret, as a person sets it up: `pomona init`.
        self.config = processes.log_dir / f"config{self.tag}" / "cluster.json"
        init = [*pomona, "init", "--cluster", cluster, "--config", str(self.config)]
        subprocess.run(init, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.commands.append(init)
        secret = ["--config", str(self.config)]
        for i in range(self.workers):
            port = free_ports(2)  # gRPC and the MLX ring on port + 1
            argv = [
                *pinned([i % (os.cpu_count() or 1)]), *pomona, "worker", "--port", str(port),
                "--host", LOOPBACK, "--name", f"w{i}", "--cluster", cluster,
                "--address", LOOPBACK, "--mdns-interface", LOOPBACK,
                "--state-dir", str(processes.log_dir / f"state{self.tag}-w{i}"),
                "--model-dir", str(model.parent), *secret,
            ]  # fmt: skip
            self.commands.append(argv)
            self.procs.append(processes.spawn(f"pomona{self.tag}-w{i}", argv))
        port = free_ports(1)
        self.address = f"{LOOPBACK}:{port}"
        argv = [
            *pomona, "coordinator", "--port", str(port), "--host", LOOPBACK,
            "--model", str(model), "--cluster", cluster, "--min-workers", str(self.workers),
            "--mdns-interface", LOOPBACK, *self.coordinator_options(), *secret,
        ]  # fmt: skip
        self.commands.append(argv)
        self.procs.append(processes.spawn(f"pomona{self.tag}-coordinator", argv))

    def coordinator_options(self) -> list[str]:
        """Options the coordinator gets beyond the cluster's own."""
        return (["--layers", self.layers] if self.layers else []) + self.options

    def ready(self) -> bool:
        import grpc

        from pomona import rpc
        from pomona.security import Auth
        from pomona.v1 import coordinator_pb2, coordinator_pb2_grpc

        if self._stub is None:
            channel = rpc.channel(self.address, Auth.load(self.config))
            self._stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            reply = self._stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=5)
        except grpc.RpcError:
            return False
        if not reply.serving:
            self.problem = reply.problem
            return False
        starts = {n.name: n.shard.start_layer for n in reply.nodes}
        self._record_runners(starts)
        return True

    def _record_runners(self, starts: dict[str, int]) -> None:
        """Note each rank's runner pid (to kill) and affinity (to report).

        The coordinator orders the workers, so a worker's rank is the order of
        the first layer it holds.
        """
        import psutil

        names = [f"w{i}" for i in range(self.workers)]
        by_rank = sorted(range(self.workers), key=lambda i: starts.get(names[i], i))
        for rank, i in enumerate(by_rank):
            proc = self.procs[i]
            self.pids[f"rank {rank} worker"] = proc.popen.pid
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.popen.pid).children(recursive=True):
                    if "pomona.worker.runner" in " ".join(child.cmdline()):
                        if self.processes is not None:
                            self.processes.extra_pids.add(child.pid)
                        self.affinity[rank] = sorted(child.cpu_affinity() or [])
                        self.pids[f"rank {rank} runner"] = child.pid
        self.pids["coordinator"] = self.procs[-1].popen.pid
        self.pids["client (this script)"] = os.getpid()

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def request(self, max_tokens: int, prompt: Sequence[int] | None = None) -> Run:
        from pomona.v1 import common_pb2

        request = common_pb2.GenerateRequest(
            prompt_tokens=list(prompt) if prompt is not None else self.prompt,
            max_tokens=max_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0),
        )
        tokens: list[int] = []
        stamps: list[float] = []
        start = time.perf_counter()
        self.last_usage = None
        for chunk in self._stub.Generate(request, timeout=600):
            now = time.perf_counter() - start
            tokens.extend(chunk.tokens)
            stamps.extend([now] * len(chunk.tokens))
            if chunk.HasField("usage"):
                self.last_usage = chunk.usage
        cached = self.last_usage.cached_tokens if self.last_usage is not None else 0
        trace = os.environ.get("POMONA_STEP_TRACE")
        if trace and stamps:  # beside the ranks' step traces: when the client asked
            with open(os.path.join(trace, "client.tsv"), "a") as f:
                began = time.monotonic() - (time.perf_counter() - start)
                f.write(f"{began:.6f}\t{stamps[0]:.6f}\t{stamps[-1]:.6f}\t{len(tokens)}\n")
        return Run(tuple(tokens), tuple(stamps), cached)

    def stop(self) -> None:
        """Stop the coordinator and the workers, and with them their runners.

        Only ``--sequential`` runs need it before the end (``Processes.stop_all``
        stops everything then): the next system wants the accelerator's memory.
        """
        if self.processes is not None:
            runners = {pid for key, pid in self.pids.items() if key.endswith("runner")}
            self.processes.stop(self.procs, runners)
