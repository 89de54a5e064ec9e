from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate, load

from pomona import demo_model
from pomona.demo_model import (
    COPIED_FILES,
    INDEX_FILE,
    SHIPPED_DIR,
    DemoModelError,
    ensure_demo_model,
    load_safetensors,
    plan_shards,
)

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo_model.py"


def _load_train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo_model", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script() -> ModuleType:
    return _load_train_script()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path):  # noqa: ANN201
    return load(str(model_dir))


def _shards(model_dir: Path) -> dict[str, dict[str, mx.array]]:
    index = json.loads((model_dir / INDEX_FILE).read_text())
    return {name: load_safetensors(model_dir / name) for name in set(index["weight_map"].values())}


def test_shipped_model_is_a_small_llama() -> None:
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "float16"
    assert config["num_hidden_layers"] >= 6
    assert config["tie_word_embeddings"] is True
    assert sum(p.stat().st_size for p in SHIPPED_DIR.iterdir()) <= 10 * 2**20


def test_greedy_generation_uses_corpus_words(loaded, train_script: ModuleType) -> None:
    model, tokenizer = loaded
    vocabulary = train_script.corpus_words(
        train_script.build_corpus(train_script.SEED, train_script.TrainConfig.corpus_bytes)
    )
    text = generate(model, tokenizer, prompt="The lab has", max_tokens=48)
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 10, text
    known = [w for w in words if w in vocabulary]
    assert len(known) >= 0.8 * len(words), text


def test_chat_prompt_matches_training_format(loaded, train_script: ModuleType) -> None:
    _, tokenizer = loaded
    messages = [{"role": "user", "content": "Hello!"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    trained = tokenizer.encode("User: Hello!\nAssistant: Hello! I am a small model.")
    assert trained[: len(prompt)] == prompt
    assert prompt[0] == tokenizer.bos_token_id


def test_index_covers_every_tensor(loaded, model_dir: Path) -> None:
    model, _ = loaded
    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    shards = _shards(model_dir)
    assert 2 <= len(shards) <= 3
    assert set(weight_map) == set(dict(tree_flatten(model.parameters())))
    for name, shard in weight_map.items():
        assert name in shards[shard]
    assert sum(len(tensors) for tensors in shards.values()) == len(weight_map)


def test_shards_hold_contiguous_layer_ranges(model_dir: Path) -> None:
    layers_by_shard: dict[str, set[int]] = {}
    for name, shard in json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].items():
        if match := re.match(r"model\.layers\.(\d+)\.", name):
            layers_by_shard.setdefault(shard, set()).add(int(match.group(1)))
    ranges = [sorted(layers) for _, layers in sorted(layers_by_shard.items())]
    assert [layer for r in ranges for layer in r] == list(range(sum(map(len, ranges))))
    assert all(r == list(range(r[0], r[-1] + 1)) for r in ranges)


def test_shards_union_equals_shipped_weights(model_dir: Path) -> None:
    shipped = load_safetensors(SHIPPED_DIR / "model.safetensors")
    union: dict[str, mx.array] = {}
    for tensors in _shards(model_dir).values():
        assert not set(union) & set(tensors)
        union.update(tensors)
    assert set(union) == set(shipped)
    for name, value in shipped.items():
        assert union[name].dtype == value.dtype == mx.float16
        assert mx.array_equal(union[name], value).item(), name
    for name in COPIED_FILES:
        assert (model_dir / name).read_bytes() == (SHIPPED_DIR / name).read_bytes()


def test_ensure_demo_model_is_idempotent(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert ensure_demo_model(tmp_path) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left behind


def test_ensure_demo_model_repairs_a_damaged_cache(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path)
    shard = sorted(first.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert ensure_demo_model(tmp_path) == first
    assert shard.is_file()


def test_ensure_demo_model_rejects_damaged_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in SHIPPED_DIR.iterdir():
        (shipped / path.name).write_bytes(path.read_bytes())
    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    monkeypatch.setattr(demo_model, "SHIPPED_DIR", shipped)
    with pytest.raises(DemoModelError, match="SHA-256"):
        ensure_demo_model(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    ("num_shards", "expected"),
    [(2, [0, 0, 0, 1, 1, 1]), (3, [0, 0, 1, 1, 2, 2])],
)
def test_plan_shards_splits_layers_evenly(num_shards: int, expected: list[int]) -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)
    ]
    plan = plan_shards(names, num_layers=6, num_shards=num_shards)
    files = sorted(set(plan.values()))
    assert plan["model.embed_tokens.weight"] == files[0]
    assert plan["model.norm.weight"] == files[-1]
    assert [files.index(plan[f"model.layers.{i}.mlp.up_proj.weight"]) for i in range(6)] == (
        expected
    )
    assert files[0] == f"model-00001-of-0000{num_shards}.safetensors"
