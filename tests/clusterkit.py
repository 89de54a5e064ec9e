"""Real clusters for tests: worker and coordinator processes on loopback.

Every process is started through the ``pomona`` CLI exactly as a person would
start it, discovers its peers through real mDNS on 127.0.0.1, and is stopped
(and its process group killed) when the test ends, failed or not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from pomona import rpc
from pomona.local import free_port_pair, free_worker_ports
from pomona.security import Auth, write_local_config
from pomona.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from pomona.worker.bandwidth import cached_speed
from pomona.worker.identity import machine_fingerprint

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (grpc.RpcError, OSError) as e:
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} ({last_error})")


def cluster_config(root: Path, cluster: str) -> Path:
    """The configuration (secret) of ``cluster`` for processes under ``root``."""
    path = root / "configs" / cluster / "cluster.json"
    if not path.exists():
        write_local_config(path.parent, cluster)
    return path


@functools.cache
def _measured_speed() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        cached_speed(Path(d), machine_fingerprint())
        return (Path(d) / "bandwidth.json").read_bytes()


def seed_speed(state_dir: Path) -> None:
    """Give a new worker's state dir this machine's measured speed, as a restarted worker
    finds it: measured once per test run instead of at every worker's first start."""
    path = state_dir / "bandwidth.json"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_measured_speed())


def spare_flag(extra: Sequence[str]) -> list[str]:
    """``--no-spare-runner`` unless ``extra`` says otherwise.

    A spare runner costs a few CPU-seconds of imports per worker start; on a
    2-core test machine that adds up over the suite, so the tests that start
    workers without loading a model soon do without. Tests of the spare (and
    ``pomona up``, which runs the defaults) pass ``--spare-runner``.
    """
    given = {"--spare-runner", "--no-spare-runner"} & set(extra)
    return [] if given else ["--no-spare-runner"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    config: Path | None = None

    @property
    def auth(self) -> Auth:
        return Auth.load(self.config) if self.config is not None else Auth.none()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalCluster:
    root: Path
    cluster: str = field(default_factory=lambda: f"test-{secrets.token_hex(4)}")
    procs: list[Proc] = field(default_factory=list)
    taken: set[int] = field(default_factory=set)

    def _spawn(
        self,
        name: str,
        args: list[str],
        port: int,
        config: Path,
        env: dict[str, str] | None = None,
    ) -> Proc:
        same = sum(p.name == name for p in self.procs)
        log = self.root / (f"{name}.log" if not same else f"{name}.{same}.log")
        with log.open("ab") as f:
            popen = subprocess.Popen(
                [sys.executable, "-m", "pomona", "-v", *args, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        proc = Proc(name, popen, log, port, config)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str,
        *,
        cluster: str | None = None,
        port: int = 0,
        extra: tuple[str, ...] = (),
        config: Path | None = None,
        model_dir: Path | None = None,
        env: dict[str, str] | None = None,
        key: str = "",
    ) -> Proc:
        """A worker named ``name``; ``key`` (default: the name) names its state dir
        and log, so that two workers may share a name as two Macs may."""
        key = key or name
        port = port or free_worker_ports(self.taken)
        seed_speed(self.state_dir(key))
        args = [
            "worker", "--port", str(port), "--host", LOOPBACK, "--name", name,
            "--cluster", cluster or self.cluster, "--address", LOOPBACK,
            "--mdns-interface", LOOPBACK, "--state-dir", str(self.state_dir(key)),
            "--model-dir", str(model_dir or self.root), *spare_flag(extra), *extra,
        ]  # fmt: skip
        config = config or cluster_config(self.root, cluster or self.cluster)
        return self._spawn(f"worker-{key}", args, port, config, env)

    def state_dir(self, key: str) -> Path:
        """Where the worker started with ``key`` keeps its node id."""
        return self.root / f"state-{key}"

    def coordinator(
        self,
        model: str,
        *,
        min_workers: int = 1,
        layers: str = "",
        extra: tuple[str, ...] = (),
        http_port: int = 0,
        config: Path | None = None,
        port: int = 0,
        state_dir: Path | None = None,
    ) -> Proc:
        port = port or free_port_pair(self.taken)
        args = [
            "coordinator", "--port", str(port), "--host", LOOPBACK, "--model", model,
            "--cluster", self.cluster, "--min-workers", str(min_workers),
            "--mdns-interface", LOOPBACK, "--objective", "throughput",
            "--http-port", str(http_port),
            "--state-dir", str(state_dir or self.root / "coordinator"), *extra,
        ]  # fmt: skip
        if layers:
            args += ["--layers", layers]
        config = config or cluster_config(self.root, self.cluster)
        return self._spawn("coordinator", args, port, config)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)


@contextlib.contextmanager
def local_cluster(root: Path, name: str = "") -> Iterator[LocalCluster]:
    cluster = LocalCluster(root, name) if name else LocalCluster(root)
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def coordinator_stub(proc: Proc) -> coordinator_pb2_grpc.CoordinatorStub:
    return coordinator_pb2_grpc.CoordinatorStub(rpc.channel(proc.address, proc.auth))


def worker_stub(proc: Proc) -> worker_pb2_grpc.WorkerStub:
    """A stub whose calls are signed for the worker's node id (learnt by Describe)."""
    node_id = describe(proc).node_id
    return worker_pb2_grpc.WorkerStub(rpc.channel(proc.address, proc.auth, node_id))


def list_nodes(coordinator: Proc) -> coordinator_pb2.ListNodesReply:
    return coordinator_stub(coordinator).ListNodes(coordinator_pb2.ListNodesRequest(), timeout=5)


def wait_serving(coordinator: Proc, timeout: float = 120.0) -> coordinator_pb2.ListNodesReply:
    def serving() -> coordinator_pb2.ListNodesReply | None:
        if not coordinator.alive():
            raise AssertionError(f"the coordinator exited:\n{coordinator.tail()}")
        reply = list_nodes(coordinator)
        return reply if reply.serving else None

    return wait_for(serving, timeout, "the cluster to serve")


def describe(worker: Proc) -> worker_pb2.DescribeReply:
    """Describe is the one call a caller may sign without knowing the node id."""
    stub = worker_pb2_grpc.WorkerStub(rpc.channel(worker.address, worker.auth))
    return stub.Describe(worker_pb2.DescribeRequest(), timeout=5)


def generate_tokens(
    coordinator: Proc,
    prompt: str,
    max_tokens: int = 16,
    temperature: float = 0.0,
    **kwargs: object,
) -> tuple[list[int], str, common_pb2.GenerateChunk]:
    """All tokens and text of one generation, and its final chunk."""
    request = common_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(temperature=temperature),
        **kwargs,  # type: ignore[arg-type]
    )
    tokens: list[int] = []
    text = ""
    last = None
    for chunk in coordinator_stub(coordinator).Generate(request, timeout=120):
        tokens.extend(chunk.tokens)
        text += chunk.text
        last = chunk
    assert last is not None
    return tokens, text, last


def generate_together(
    coordinator: Proc, prompts: Sequence[str], max_tokens: int, timeout: float = 120
) -> dict[str, list[int]]:
    """The greedy tokens of every prompt, all requested at once (one thread each)."""
    results: dict[str, list[int]] = {}
    threads = [
        threading.Thread(
            target=lambda p=p: results.__setitem__(
                p, generate_tokens(coordinator, p, max_tokens)[0]
            )
        )
        for p in prompts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def reference_tokens(model_path: Path, prompt: str, max_tokens: int) -> list[int]:
    """Greedy tokens of single-process mlx-lm, up to its end of sequence."""
    return reference_tokens_of(model_path, [prompt], max_tokens)[prompt]


def reference_tokens_of(
    model_path: Path, prompts: list[str], max_tokens: int
) -> dict[str, list[int]]:
    """``reference_tokens`` of each prompt, loading the model once."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(str(model_path))
    bos = tokenizer.bos_token
    tokens: dict[str, list[int]] = {}
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        out = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
            if token in tokenizer.eos_token_ids:
                break
            out.append(int(token))
        tokens[prompt] = out
    return tokens
