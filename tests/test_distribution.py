"""The coordinator's choices about model distribution, without sockets."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from pomona.coordinator.distribution import (
    Distributor,
    StageNeed,
    check_disk,
    holds_stage,
    prefer_holders,
)
from pomona.coordinator.links import Candidate, Links, Measurement
from pomona.coordinator.monitor import Monitor
from pomona.coordinator.placement import Assignment, PlacementError
from pomona.v1 import transfer_pb2, worker_pb2

GB = 10**9


def node(
    node_id: str, memory: int = 64 * GB, chip: str = "Apple M2 Pro"
) -> worker_pb2.DescribeReply:
    return worker_pb2.DescribeReply(
        node_id=node_id,
        name=f"mac-{node_id}",
        hardware=worker_pb2.Hardware(chip=chip, total_memory_bytes=memory),
    )


def holding(
    complete: bool = True,
    stages: tuple[tuple[int, int, bool, bool], ...] = (),
    free: int = 500 * GB,
) -> transfer_pb2.ListModelsReply:
    return transfer_pb2.ListModelsReply(
        models=[
            transfer_pb2.HeldModel(
                model="m",
                complete=complete,
                stages=[
                    transfer_pb2.LayerRange(start_layer=s, end_layer=e, first=f, last=la)
                    for s, e, f, la in stages
                ],
            )
        ],
        cache_dir="/cache",
        cache_free_bytes=free,
    )


def plan(*ids: str, sizes: tuple[int, ...] = ()) -> list[Assignment]:
    sizes = sizes or tuple(10 * GB for _ in ids)
    per = 8
    return [Assignment(n, f"mac-{n}", i * per, (i + 1) * per, sizes[i]) for i, n in enumerate(ids)]


def test_a_holder_of_the_whole_model_takes_the_largest_stage_of_its_kind() -> None:
    nodes = [node("a"), node("b"), node("c")]
    got = prefer_holders(
        plan("a", "b", "c", sizes=(5 * GB, 9 * GB, 7 * GB)), nodes, {"c": holding()}, "m"
    )
    assert [a.node_id for a in got] == ["a", "c", "b"]
    assert [(a.start, a.end, a.weights_bytes) for a in got] == [
        (a.start, a.end, a.weights_bytes)
        for a in plan("a", "b", "c", sizes=(5 * GB, 9 * GB, 7 * GB))
    ]


def test_a_holder_of_another_kind_is_not_swapped_in() -> None:
    nodes = [node("a"), node("b", memory=128 * GB)]
    assignments = plan("a", "b")
    assert prefer_holders(assignments, nodes, {"b": holding()}, "m") == assignments


def test_a_spare_holder_replaces_a_planned_machine_of_its_kind() -> None:
    nodes = [node("a"), node("b"), node("spare")]
    got = prefer_holders(plan("a", "b"), nodes, {"spare": holding()}, "m")
    assert sorted(a.node_id for a in got) in (["a", "spare"], ["b", "spare"])


def test_a_worker_keeps_the_stage_folder_it_already_received() -> None:
    nodes = [node("a"), node("b"), node("c")]
    survey = {"a": holding(), "c": holding(False, ((8, 16, False, False),))}
    got = prefer_holders(plan("a", "b", "c"), nodes, survey, "m")
    assert got[1].node_id == "c"


@pytest.mark.parametrize("seed", range(20))
def test_preferring_holders_keeps_ranges_and_uses_each_machine_once(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(rng.randint(1, 6))]
    nodes = [node(i, memory=rng.choice((64, 128)) * GB) for i in ids]
    planned = rng.sample(ids, rng.randint(1, len(ids)))
    survey = {i: holding() for i in ids if rng.random() < 0.4}
    assignments = plan(*planned, sizes=tuple(rng.randint(1, 20) * GB for _ in planned))
    got = prefer_holders(assignments, nodes, survey, "m")
    assert len({a.node_id for a in got}) == len(got), f"seed {seed}"
    kinds = {n.node_id: n.hardware.total_memory_bytes for n in nodes}
    for before, after in zip(assignments, got, strict=True):
        assert (before.start, before.end) == (after.start, after.end), f"seed {seed}"
        assert kinds[before.node_id] == kinds[after.node_id], f"seed {seed}"


def test_a_stage_folder_covers_only_its_own_range_and_ends() -> None:
    held = holding(False, ((0, 8, True, False),)).models[0]
    assert holds_stage(held, StageNeed(0, 8, True, False))
    assert holds_stage(held, StageNeed(2, 8, False, False))
    assert not holds_stage(held, StageNeed(0, 8, True, True))
    assert not holds_stage(held, StageNeed(4, 12, False, False))


def test_a_transfer_that_does_not_fit_the_disk_is_refused_with_the_figure() -> None:
    survey = {
        "a": holding(),
        "b": transfer_pb2.ListModelsReply(cache_dir="/small", cache_free_bytes=4 * GB),
    }
    with pytest.raises(PlacementError) as e:
        check_disk(plan("a", "b"), survey, "m")
    message = str(e.value)
    assert "mac-b would fetch layers [8, 16) of m" in message
    assert "/small" in message and "short" in message
    check_disk(plan("a", "b"), {**survey, "b": holding(False, free=20 * GB)}, "m")


def test_the_cache_limit_counts_as_the_room_for_a_transfer() -> None:
    reply = transfer_pb2.ListModelsReply(cache_free_bytes=900 * GB, cache_max_bytes=5 * GB)
    with pytest.raises(PlacementError, match="short"):
        check_disk(plan("a"), {"a": reply}, "m")


def test_measured_bandwidths_that_differ_by_noise_still_make_machines_interchangeable() -> None:
    nodes = [node("a"), node("b"), node("c")]
    for n, bw in zip(nodes, (1.2, 2.1, 1.9), strict=True):
        n.hardware.chip = ""
        n.hardware.measured_bandwidth_gbs = bw
    assignments = plan("a", "b", "c", sizes=(9 * GB, 9 * GB, 6 * GB))
    got = prefer_holders(assignments, nodes, {"c": holding()}, "m")
    assert got[0].node_id == "c"
    nodes[2].hardware.chip = "another CPU"  # a different machine
    assert prefer_holders(assignments, nodes, {"c": holding()}, "m") == assignments


def test_models_and_transfers_read_as_one_line_each() -> None:
    from pomona.coordinator.distribution import cluster_models
    from pomona.models_cmd import models_text
    from pomona.status_view import transfer_lines
    from pomona.v1 import coordinator_pb2

    survey = {
        "a": holding(),
        "b": holding(False, ((4, 8, False, True),)),
        "c": transfer_pb2.ListModelsReply(),
    }
    survey["a"].models[0].bytes = 40 * GB
    survey["b"].models[0].bytes = 12 * GB
    reply = cluster_models(survey, {"a": "mini-1", "b": "mini-2", "c": "mini-3"})
    assert models_text(reply) == ["m  37.3 GiB  mini-1 (whole), mini-2 (layers 4-7, 11.2 GiB)"]
    assert models_text(coordinator_pb2.ClusterModels())[0].startswith("no worker holds a model")
    progress = transfer_pb2.TransferProgress(
        state="fetching", bytes_done=GB, bytes_total=4 * GB, bytes_per_s=100e6, eta_s=30.0
    )
    [line] = transfer_lines([coordinator_pb2.NodeTransfer(name="mini-2", progress=progress)])
    assert str(line) == "mini-2: fetching its stage, 0.9 GiB of 3.7 GiB (25%), 95 MiB/s, 30 s left"


@dataclass
class Holder:
    node_id: str
    address: str
    name: str = ""
    describe: worker_pb2.DescribeReply = field(default_factory=worker_pb2.DescribeReply)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


def test_a_receiver_fetches_from_the_holder_on_its_fastest_measured_link_first() -> None:
    receiver = Holder("r", "10.0.0.9:7000")
    ethernet = Holder("e", "10.0.0.1:7000")  # holds the model whole, 1 Gbit/s away
    thunderbolt = Holder("t", "10.0.0.2:7000")  # holds it whole too, also over Thunderbolt
    folder = Holder("f", "10.0.0.3:7000")  # holds a stage folder only
    survey = {
        "e": holding(complete=True),
        "t": holding(complete=True),
        "f": holding(complete=False, stages=((0, 4, True, False),)),
    }
    links = Links()
    measured = [
        Measurement("r", "e", Candidate("10.0.0.1", "en0", "ethernet"), 0.2, 118e6),
        Measurement("r", "t", Candidate("10.0.0.2", "en0", "ethernet"), 0.2, 117e6),
        Measurement("r", "t", Candidate("169.254.7.2", "bridge0", "thunderbolt"), 0.05, 2.4e9),
    ]
    links.figures = {(m.src, m.dst, m.candidate.address): m for m in measured}
    dist = Distributor(Monitor(), lambda address, target: None)  # type: ignore[arg-type,return-value]
    members = [receiver, ethernet, thunderbolt, folder]
    unmeasured = dist.sources(members, "m", receiver, survey)
    assert unmeasured == [("10.0.0.1:7000", "e"), ("10.0.0.2:7000", "t"), ("10.0.0.3:7000", "f")]
    dist.links = links
    # Thunderbolt first, then the same holder where it was found (a daemon listening on
    # one address refuses the other), then the rest: whole models before stage folders.
    assert dist.sources(members, "m", receiver, survey) == [
        ("169.254.7.2:7000", "t"),
        ("10.0.0.2:7000", "t"),
        ("10.0.0.1:7000", "e"),
        ("10.0.0.3:7000", "f"),
    ]


def test_a_tensor_rank_needs_room_for_the_whole_model() -> None:
    """A tensor rank holds a slice of every layer but fetches every tensor."""
    holder = holding()
    holder.models[0].bytes = 40 * GB
    survey = {
        "a": holder,
        "b": transfer_pb2.ListModelsReply(cache_dir="/mid", cache_free_bytes=30 * GB),
    }
    ranks = [
        Assignment("a", "mac-a", 0, 16, 20 * GB, whole=True),
        Assignment("b", "mac-b", 0, 16, 20 * GB, whole=True),
    ]
    with pytest.raises(PlacementError) as e:
        check_disk(ranks, survey, "m")
    assert "mac-b would fetch every tensor of m" in str(e.value)
    assert "37.3 GiB, but its model cache (/mid) has 27.9 GiB free, 9.3 GiB short" in str(e.value)
