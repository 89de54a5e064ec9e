"""Each rank's environment and files equal what MLX's own launcher gives it.

`mlx.launch` builds, per backend, a list of per-rank arguments and hands them to
`_launch_with_io`; each rank then runs the bash script of
`RemoteProcess.make_launch_script`. The tests catch those arguments, run that very
script locally with a command that prints its environment and files, and compare
with `pomona.backends`. The only difference allowed is the newline `echo` adds at the
end of each file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from mlx._distributed_utils import launch
from mlx._distributed_utils.common import Host

from pomona.backends import (
    RankHost,
    devices_from_wire,
    devices_to_wire,
    missing_rdma,
    mlx_backend,
    rank_launch,
)

PORT = 32323
KEYS = ("MLX_", "NCCL_", "CUDA_VISIBLE_DEVICES")
FILES = ("MLX_HOSTFILE", "MLX_IBV_DEVICES")
DUMP = (
    "import json, os\n"
    f"keys, files = {KEYS!r}, {FILES!r}\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith(keys)}\n"
    "out = {k: (open(v).read() if k in files else v) for k, v in env.items()}\n"
    "print(json.dumps(out))\n"
)


class _ParserError(Exception):
    pass


class _Parser:
    def error(self, message: str) -> None:
        raise _ParserError(message)


def mlx_launch(backend: str, hosts: list[Host]) -> list[dict[str, str]]:
    """Each rank's MLX_*/NCCL_* variables (file variables: the file's content) under
    `mlx.launch --backend BACKEND`, found by running its per-rank launch script."""
    calls: list[Any] = []
    original = launch._launch_with_io
    launch._launch_with_io = lambda cls, arguments, verbose: calls.extend(arguments)
    args = argparse.Namespace(
        backend=backend,
        env=[],
        cwd=None,
        python=None,
        verbose=False,
        starting_port=PORT,
        connections_per_ip=1,
        nccl_port=PORT,
        repeat_hosts=1,
    )
    try:
        run = {
            "ring": launch.launch_ring,
            "nccl": launch.launch_nccl,
            "jaccl": launch.launch_jaccl,
            "jaccl-ring": launch.launch_jaccl,
        }[backend]
        run(_Parser(), hosts, args, ["true"])
    finally:
        launch._launch_with_io = original
    ranks = []
    for (rank, _host, python, cwd, files, env, _), _kw in calls:
        script = launch.RemoteProcess.make_launch_script(
            rank, python, cwd, files, env, [sys.executable, "-c", DUMP], True
        )
        done = subprocess.run(
            ["/bin/bash", "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": os.environ["PATH"]},
        )
        pidfile, line = done.stdout.strip().split("\n")
        os.unlink(pidfile)
        ranks.append(json.loads(line))
    return ranks


def pomona_launch(backend: str, hosts: list[Host]) -> list[dict[str, str]]:
    """The same, from `pomona.backends`, with each rank's ring listeners on the ports
    mlx.launch would choose (one per host and IP, counting up from PORT)."""
    port = PORT
    ranks = []
    for h in hosts:
        addresses = []
        for ip in h.ips:
            addresses.append(f"{ip}:{port}")
            port += 1
        rdma = tuple(tuple(d) if isinstance(d, list) else d for d in h.rdma)
        ranks.append(RankHost(tuple(addresses), rdma))
    out = []
    for rank in range(len(hosts)):
        got = rank_launch(backend, rank, ranks)
        files = {k: v + "\n" for k, v in got.files.items()}  # `echo` ends the file
        out.append({**got.env, **files})
    return out


def mesh(n: int, cables: int = 1) -> list[Host]:
    """n Macs, each cabled to every other (``cables`` per pair)."""
    hosts = []
    for i in range(n):
        rdma: list[Any] = []
        for j in range(n):
            names = [f"rdma_en{2 + (j + c) % 4}" for c in range(cables)]
            rdma.append(None if i == j else names[0] if cables == 1 else names)
        hosts.append(Host(i, f"mac{i}", [f"10.0.{i}.1", f"192.168.{i}.2"], rdma))
    return hosts


def ring_of_cables(n: int) -> list[Host]:
    """n Macs cabled in a ring: devices towards the neighbours only."""
    hosts = []
    for i in range(n):
        rdma: list[Any] = [None] * n
        rdma[(i + 1) % n] = "rdma_en3"
        rdma[(i - 1) % n] = "rdma_en2" if n > 2 else "rdma_en3"
        hosts.append(Host(i, f"mac{i}", [f"10.0.{i}.1"], rdma))
    return hosts


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize(
    ("backend", "topology"),
    [
        ("ring", mesh),
        ("nccl", mesh),
        ("jaccl", mesh),
        ("jaccl", lambda n: mesh(n, cables=2)),
        ("jaccl-ring", ring_of_cables),
        ("jaccl-ring", mesh),
    ],
)
def test_rank_environment_equals_mlx_launch(backend: str, topology: Any, n: int) -> None:
    hosts = topology(n)
    assert pomona_launch(backend, hosts) == mlx_launch(backend, hosts)


@pytest.mark.parametrize("n", [4, 5])  # three in a ring are a mesh
def test_jaccl_mesh_on_a_ring_of_cables_misses_pairs_as_mlx_launch_refuses(n: int) -> None:
    hosts = ring_of_cables(n)
    with pytest.raises(_ParserError, match="no RDMA device is listed"):
        mlx_launch("jaccl", hosts)
    ranks = [RankHost((f"{h.ips[0]}:1",), tuple(h.rdma)) for h in hosts]
    missing = missing_rdma("jaccl", ranks)
    assert missing and all(abs(i - j) not in (1, n - 1) for i, j in missing)
    assert missing_rdma("jaccl-ring", ranks) == []


def test_devices_travel_as_lists_and_jaccl_ring_inits_jaccl() -> None:
    for devices in (None, "rdma_en2", ("rdma_en2", "rdma_en3")):
        assert devices_from_wire(devices_to_wire(devices)) == devices
    assert mlx_backend("jaccl-ring") == "jaccl" and mlx_backend("ring") == "ring"
    with pytest.raises(ValueError, match="unknown backend"):
        rank_launch("mpi", 0, [RankHost(("10.0.0.1:1",))])
