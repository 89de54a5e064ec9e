"""Loading a layer range: which files are read, which parameters exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from modelfactory import ARCHITECTURES, make_model

from pomona.worker.shard import StageSpec, files_for_stage, load_stage, weight_map


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_layers=6, shards=3)


def test_a_middle_stage_reads_only_the_files_of_its_layers(model: Path) -> None:
    wmap = weight_map(model)
    # layers 0-1 in file 1 (with the embedding), 2-3 in file 2, 4-5 in file 3 (with the head)
    middle = files_for_stage(wmap, 6, StageSpec(2, 4, rank=1, world_size=3))
    assert middle == ["model-00002-of-00003.safetensors"]
    first = files_for_stage(wmap, 6, StageSpec(0, 2, rank=0, world_size=3))
    assert "model-00001-of-00003.safetensors" in first
    assert "model-00002-of-00003.safetensors" not in first


def test_a_middle_stage_loads_with_the_other_files_unreadable(model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).symlink_to(f)
    for name in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        (copy / name).unlink()
        (copy / name).write_bytes(b"")
        os.chmod(copy / name, 0)
    shard = load_stage(copy, StageSpec(2, 4, rank=1, world_size=3))
    assert shard.files == ["model-00002-of-00003.safetensors"]
    layer_bytes = shard.weights_bytes
    whole = load_stage(model, StageSpec(0, 6))
    assert 0 < layer_bytes < whole.weights_bytes / 2


def test_stage_memory_is_its_layers_plus_what_its_ends_need(model: Path) -> None:
    import mlx.core as mx

    mx.clear_cache()
    sizes = [load_stage(model, StageSpec(s, e, r, 3)).weights_bytes for s, e, r in
             [(0, 2, 0), (2, 4, 1), (4, 6, 2)]]  # fmt: skip
    whole = load_stage(model, StageSpec(0, 6)).weights_bytes
    assert sum(sizes) == whole  # untied head: nothing is held twice


def test_a_range_outside_the_model_is_refused(model: Path) -> None:
    with pytest.raises(ValueError, match="outside the model's 6 layers"):
        load_stage(model, StageSpec(4, 9, rank=1, world_size=2))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_stage_agrees_on_what_crosses_a_boundary(
    arch: str, dtype: str, tmp_path: Path
) -> None:
    """A middle stage loads no embedding, yet expects what its neighbour sends.

    With the unloaded embedding left at float32, a middle stage of a float16
    model expected twice the bytes it was sent: three workers hung.
    """
    import mlx.core as mx

    from pomona.worker.shard import wire_dtype

    folder = make_model(tmp_path / arch, arch, num_layers=6, shards=3, dtype=dtype)
    stages = [StageSpec(s, e, r, 4) for r, (s, e) in enumerate([(0, 1), (1, 3), (3, 5), (5, 6)])]
    wires = {wire_dtype(load_stage(folder, spec).model) for spec in stages}
    assert wires == {getattr(mx, dtype)}
