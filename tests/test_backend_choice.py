"""RDMA facts read from real macOS outputs, and the backend `auto` picks from them.

Recorded: `rdma_ctl status` (a Thunderbolt 4 Mac: "enabled") and `networksetup
-listallhardwareports` of an M3 Ultra Mac Studio. Not recorded anywhere we could
find: `ibv_devices` and `system_profiler SPThunderboltDataType -json`; their fixtures
below follow what mlx.distributed_config reads from them (every word starting with
"rdma_"; buses with domain_uuid_key, receptacle_1_tag.receptacle_id_key, _items).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
from macos_recordings import recorded

from pomona.coordinator.backend_choice import NodeFacts, choose_backend, facts_of, rdma_matrix
from pomona.worker.backend_facts import (
    ThunderboltPort,
    facts_to_proto,
    parse_ibv_devices,
    parse_rdma_status,
    parse_thunderbolt_ports,
    read_backend_facts,
)

PORTS_M3_ULTRA = (
    "networksetup_listallhardwareports__knurlogic_Mac15-14_M3Ultra_MacStudio_trimmed.txt"
)
TB4_ENABLED = "rdma_ctl_status__omlx-issue-3037_TB4_enabled.txt"

# Not recorded: the layout of `ibv_devices` (libibverbs) with two devices.
IBV_DEVICES = """    device                 node GUID
    ------              ----------------
    rdma_en2            0000000000000000
    rdma_en3            0000000000000000
"""


def sp_thunderbolt(ports: dict[int, tuple[str, str]]) -> str:
    """SPThunderboltDataType JSON: receptacle tag -> (own domain uuid, peer uuid or "")."""
    buses = []
    for tag, (uuid, peer) in ports.items():
        items = [{"_name": "Mac Studio", "domain_uuid_key": peer}] if peer else []
        buses.append(
            {
                "_name": "thunderboltusb4_bus_" + str(tag),
                "device_name_key": "Mac Studio",
                "domain_uuid_key": uuid,
                "receptacle_1_tag": {"receptacle_id_key": str(tag)},
                "_items": items,
            }
        )
    return json.dumps({"SPThunderboltDataType": buses})


def test_thunderbolt_4_mac_says_enabled_and_lists_no_device() -> None:
    facts = read_backend_facts(
        lambda argv: {"rdma_ctl": recorded(TB4_ENABLED), "ibv_devices": ""}.get(argv[0]),
        system="Darwin",
    )
    assert facts.rdma_status == "enabled" and facts.rdma_devices == ()
    choice = choose_backend("auto", [NodeFacts("a", "enabled"), NodeFacts("b", "enabled")])
    assert choice.backend == "ring"
    assert "ibv_devices lists no device" in choice.reason and "a, b" in choice.reason


def test_ports_are_named_by_networksetup_and_joined_to_their_peer() -> None:
    sp = sp_thunderbolt({1: ("A1", "B1"), 2: ("A2", ""), 3: ("A3", "C1")})
    ports = parse_thunderbolt_ports(sp, recorded(PORTS_M3_ULTRA))
    assert ports == (
        ThunderboltPort("en2", "A1", "B1"),
        ThunderboltPort("en3", "A2", ""),
        ThunderboltPort("en4", "A3", "C1"),
    )
    assert parse_ibv_devices(IBV_DEVICES) == ("rdma_en2", "rdma_en3")
    assert parse_rdma_status(None) is None and parse_rdma_status(" disabled\n") == "disabled"
    assert parse_thunderbolt_ports("not json", recorded(PORTS_M3_ULTRA)) == ()


def test_linux_reports_no_rdma_as_not_applicable() -> None:
    facts = read_backend_facts(lambda argv: "enabled", system="Linux")
    assert facts.rdma_status is None and facts.rdma_devices == () and not facts.cuda
    proto = facts_to_proto(facts)
    assert proto.rdma_status == "" and not proto.rdma_devices
    assert "n/a" in choose_backend("auto", [facts_of("a", proto), facts_of("b", proto)]).reason


def cabled(
    names: Sequence[str], cables: Sequence[tuple[int, int]], dead: str = ""
) -> list[NodeFacts]:
    """Macs joined by ``cables`` (index pairs); ``dead``'s devices are not listed."""
    ports: dict[int, list[tuple[str, str, str]]] = {i: [] for i in range(len(names))}
    for k, (i, j) in enumerate(cables):
        a, b = f"u{k}a", f"u{k}b"
        ports[i].append((f"en{2 + len(ports[i])}", a, b))
        ports[j].append((f"en{2 + len(ports[j])}", b, a))
    return [
        NodeFacts(
            name,
            "enabled",
            () if name == dead else tuple(f"rdma_{p[0]}" for p in ports[i]),
            tuple(ports[i]),
        )
        for i, name in enumerate(names)
    ]


def mesh_cables(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def ring_cables(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_auto_picks_jaccl_for_a_mesh_and_jaccl_ring_for_a_ring(n: int) -> None:
    names = [f"mac{i}" for i in range(n)]
    mesh = choose_backend("auto", cabled(names, mesh_cables(n)))
    assert mesh.backend == "jaccl", mesh.reason
    ring = choose_backend("auto", cabled(names, ring_cables(n)))
    if n <= 3:  # two or three Macs in a ring are a mesh
        assert ring.backend == "jaccl"
    else:
        assert ring.backend == "jaccl-ring"
        assert "only a ring" in ring.reason and "mac0-mac1-" in ring.reason
        assert "mac0-mac2" in ring.reason  # a missing mesh pair is named
    # The device matrix is the one each rank's MLX_IBV_DEVICES will hold.
    matrix = rdma_matrix(cabled(names, ring_cables(n)))
    assert all(matrix[i][i] == () for i in range(n))
    assert matrix[0][1] == ("rdma_en2",)


def test_a_mac_with_its_devices_missing_breaks_rdma_for_its_pairs() -> None:
    nodes = cabled(["a", "b", "c"], mesh_cables(3), dead="b")
    choice = choose_backend("auto", nodes)
    assert choice.backend == "ring" and "a-b" in choice.reason and "b-c" in choice.reason


def test_random_cablings_pick_jaccl_only_when_every_needed_pair_is_cabled() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        n = rng.randint(2, 6)
        cables = [p for p in mesh_cables(n) if rng.random() < 0.7]
        nodes = cabled([f"m{i}" for i in range(n)], cables)
        got = choose_backend("auto", nodes).backend
        joined = {frozenset(c) for c in cables}
        ring_ok = all(frozenset((i, (i + 1) % n)) in joined for i in range(n))
        mesh_ok = len(joined) == n * (n - 1) // 2
        want = "jaccl" if mesh_ok else "jaccl-ring" if ring_ok else "ring"
        assert got == want, f"seed {seed}: cables {cables}"


def test_cuda_everywhere_picks_nccl_and_a_named_backend_is_used_as_asked() -> None:
    gpus = [NodeFacts("g0", cuda=True), NodeFacts("g1", cuda=True)]
    assert choose_backend("auto", gpus).backend == "nccl"
    assert choose_backend("auto", [gpus[0], NodeFacts("mac")]).backend == "ring"
    forced = choose_backend("jaccl", [NodeFacts("a"), NodeFacts("b")])
    assert forced.backend == "jaccl" and "ring takes over" in forced.reason
    assert choose_backend("ring", cabled(["a", "b"], [(0, 1)])).backend == "ring"
    assert choose_backend("auto", [NodeFacts("solo")]).backend == "ring"
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("mpi", gpus)


def test_two_ranks_on_one_machine_never_get_nccl() -> None:
    """`pomona up --local 2` on a CUDA machine: both ranks would take its first GPU, and
    NCCL refuses two ranks on one GPU ("invalid usage", seen on the lent H200)."""
    gpus = [NodeFacts("local-1", cuda=True), NodeFacts("local-2", cuda=True)]
    local = choose_backend("auto", gpus, ["127.0.0.1", "127.0.0.1"])
    assert local.backend == "ring"
    assert "local-1, local-2 share one machine" in local.reason
    assert choose_backend("auto", gpus, ["10.0.0.1", "10.0.0.2"]).backend == "nccl"
    forced = choose_backend("nccl", gpus, ["127.0.0.1", "127.0.0.1"])
    assert forced.backend == "nccl" and "ring takes over" in forced.reason


def test_the_device_matrix_travels_in_load_requests_to_each_ranks_file() -> None:
    from pomona.backends import rank_launch
    from pomona.coordinator.backend_choice import rdma_rows
    from pomona.v1 import worker_pb2
    from pomona.worker.daemon import launch_hosts

    nodes = cabled(["a", "b", "c", "d"], ring_cables(4) + [(0, 2)])  # a-c: two cables
    choice = choose_backend("auto", nodes)
    assert choice.backend == "jaccl-ring"
    ring = [f"10.0.0.{i}:50152" for i in range(4)]
    request = worker_pb2.LoadRequest(ring_hosts=ring, rdma=rdma_rows(choice))
    launch = rank_launch(choice.backend, 2, launch_hosts(request))
    assert launch.env == {
        "MLX_RANK": "2",
        "MLX_JACCL_COORDINATOR": "10.0.0.0:50152",
        "MLX_JACCL_RING": "1",
    }
    matrix = json.loads(launch.files["MLX_IBV_DEVICES"])
    assert matrix[2] == ["rdma_en4", "rdma_en2", None, "rdma_en3"]
    assert [matrix[i][i] for i in range(4)] == [None] * 4
    assert rdma_rows(choose_backend("ring", nodes)) == []


def test_auto_keeps_to_backends_every_workers_mlx_has() -> None:
    nodes = cabled(["a", "b"], [(0, 1)])
    old = [nodes[0], replace(nodes[1], mlx_backends=("ring", "mpi"))]
    choice = choose_backend("auto", old)
    assert choice.backend == "ring" and "MLX on b has no JACCL" in choice.reason
    both = [replace(n, mlx_backends=("ring", "jaccl")) for n in nodes]
    assert choose_backend("auto", both).backend == "jaccl"
    gpus = [NodeFacts("g0", cuda=True, mlx_backends=("ring",)), NodeFacts("g1", cuda=True)]
    assert choose_backend("auto", gpus).backend == "ring"
