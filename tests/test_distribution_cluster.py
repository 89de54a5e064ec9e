"""A model on one worker is enough: real worker and coordinator processes, real gRPC.

Only one worker's model directory holds the model; the others fetch exactly
their stage's tensors from it before their runners start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clusterkit import generate_tokens, local_cluster, reference_tokens, wait_serving
from modelfactory import make_model

from pomona.safetensors_layout import read_layout
from pomona.worker.shard import weight_map
from pomona.worker.stage_cache import StageKey, tensors_for_stage

pytestmark = pytest.mark.cluster

PROMPT = "The lab has four machines and"


def _share(model: Path, key: StageKey) -> tuple[list[str], int]:
    layout = {}
    for file in set(weight_map(model).values()):
        layout.update(read_layout(model / file))
    names = tensors_for_stage(list(layout), key)
    return sorted(names), sum(layout[n].info.nbytes for n in names)


def _stage_folders(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "stages").glob("*/*") if p.is_dir())


def _check_only_its_share(model: Path, cache: Path, shard: object, world: int) -> None:
    folders = _stage_folders(cache)
    assert len(folders) == 1, folders
    folder = folders[0]
    key = StageKey.of(shard.start_layer, shard.end_layer, shard.rank, world)  # type: ignore[attr-defined]
    names, nbytes = _share(model, key)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == names
    held = read_layout(folder / "model.safetensors")
    assert sum(t.info.nbytes for t in held.values()) == nbytes
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]


def _run(tmp_path: Path, workers: int, layers: str, num_layers: int) -> None:
    model = make_model(
        tmp_path / "holder" / "tiny", "llama", num_layers=num_layers, shards=3, seed=7
    )
    expected = reference_tokens(model, PROMPT, 24)
    with local_cluster(tmp_path) as c:
        procs = []
        for i in range(workers):
            extra: tuple[str, ...] = ("--cache-dir", str(tmp_path / f"cache-w{i}"))
            if i == 0:
                extra += ("--model-dir", str(tmp_path / "holder"))
            procs.append(c.worker(f"w{i}", extra=extra))
        coord = c.coordinator("tiny", min_workers=workers, layers=layers)
        reply = wait_serving(coord)
        tokens, _, _ = generate_tokens(coord, PROMPT, max_tokens=24)
        assert tokens == expected
        by_name = {n.name: n for n in reply.nodes}
        assert not _stage_folders(tmp_path / "cache-w0")
        for i in range(1, workers):
            _check_only_its_share(model, tmp_path / f"cache-w{i}", by_name[f"w{i}"].shard, workers)


def test_a_model_on_one_of_two_workers_serves_with_greedy_tokens_of_mlx_lm(tmp_path: Path) -> None:
    _run(tmp_path, 2, "2,2", 4)


def test_three_workers_each_receive_only_their_share(tmp_path: Path) -> None:
    _run(tmp_path, 3, "2,2,2", 6)
