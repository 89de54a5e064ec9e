"""Model names resolve only inside the model directories or the HF cache, and only safely.

Folders here hold a config.json and placeholder weight files: resolving a name never
parses weights, so no real model is needed.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pomona.config import DEFAULT_MODEL
from pomona.models import ModelNotFound, ModelRefused, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_model(
    folder: Path,
    weights: tuple[str, ...] = ("model.safetensors",),
    config: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    for name in weights:
        (folder / name).write_bytes(b"\0" * 8)
    return folder


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_model(root / "tiny")
    return root


def refused(name: str, model_dirs: tuple[Path, ...], **kwargs: Any) -> str:
    with pytest.raises(ModelRefused) as info:
        resolve_model(name, model_dirs, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- What resolves --------------------------------------------------------------------


def test_a_name_inside_a_model_dir_resolves(models: Path, tmp_path: Path) -> None:
    other = tmp_path / "empty"
    other.mkdir()
    assert resolve_model("tiny", (other, models), hf_cache=tmp_path) == (models / "tiny").resolve()
    assert resolve_model("./tiny", (models,), hf_cache=tmp_path) == (models / "tiny").resolve()


def test_a_nested_name_inside_a_model_dir_resolves(models: Path, tmp_path: Path) -> None:
    make_model(models / "org" / "chat")
    assert resolve_model("org/chat", (models,), hf_cache=tmp_path) == (models / "org/chat")


def test_an_absolute_path_inside_a_model_dir_resolves(models: Path, tmp_path: Path) -> None:
    path = str(models / "tiny")
    assert resolve_model(path, (models,), hf_cache=tmp_path) == (models / "tiny").resolve()


def test_an_absolute_path_through_a_symlinked_model_dir_resolves(
    models: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(models)
    real = str(models / "tiny")
    assert resolve_model(real, (alias,), hf_cache=tmp_path) == (models / "tiny").resolve()
    assert resolve_model("tiny", (alias,), hf_cache=tmp_path) == (models / "tiny").resolve()


def test_symlinks_that_stay_inside_the_model_dir_are_followed(models: Path, tmp_path: Path) -> None:
    (models / "latest").symlink_to(models / "tiny")
    shared = models / "shared.safetensors"
    shared.write_bytes(b"\0")
    linked = make_model(models / "linked", weights=())
    (linked / "model.safetensors").symlink_to(shared)
    assert resolve_model("latest", (models,), hf_cache=tmp_path) == (models / "tiny").resolve()
    assert resolve_model("linked", (models,), hf_cache=tmp_path) == linked.resolve()


def _hf_repo(hub: Path, repo: str) -> Path:
    """A repo laid out as huggingface_hub does: snapshot files are links to blobs."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    make_model(snapshot, weights=())
    (folder / "blobs").mkdir()
    (folder / "blobs" / "abc").write_bytes(b"\0" * 8)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/abc"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_repo_id_in_the_hf_cache_resolves(models: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = _hf_repo(hub, "mlx-community/Tiny-4bit")
    found = resolve_model("mlx-community/Tiny-4bit", (models,), hf_cache=hub)
    assert found == snapshot.resolve()


def test_an_absolute_path_inside_the_hf_cache_resolves(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = _hf_repo(hub, "org/tiny")
    assert resolve_model(str(snapshot), (), hf_cache=hub) == snapshot.resolve()


def test_the_demo_name_resolves_to_the_builtin_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = types.ModuleType("pomona.demo_model")
    demo.ensure_demo_model = lambda cache: tmp_path / "demo"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pomona.demo_model", demo)
    assert resolve_model("pomona-demo", ()) == tmp_path / "demo"


def test_remote_code_is_allowed_only_when_asked(models: Path, tmp_path: Path) -> None:
    make_model(models / "custom", config={"model_type": "llama", "auto_map": {"AutoModel": "x"}})
    found = resolve_model("custom", (models,), hf_cache=tmp_path, allow_remote_code=True)
    assert found == (models / "custom").resolve()


# --- What is refused ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../etc", "..", "tiny/../../etc", "a/../tiny", "../models/tiny"]
)
def test_dot_dot_names_are_refused(models: Path, tmp_path: Path, name: str) -> None:
    assert "contains '..'" in refused(name, (models,), hf_cache=tmp_path)


def test_absolute_paths_outside_the_model_dirs_are_refused(models: Path, tmp_path: Path) -> None:
    outside = make_model(tmp_path / "elsewhere" / "tiny")
    for name in (str(outside), "/etc", "/"):
        message = refused(name, (models,), hf_cache=tmp_path / "hub")
        assert "is outside the model directories" in message and "--model-dir" in message


def test_a_directory_symlink_out_of_the_model_dir_is_refused(models: Path, tmp_path: Path) -> None:
    outside = make_model(tmp_path / "elsewhere" / "secret")
    (models / "evil").symlink_to(outside)
    message = refused("evil", (models,), hf_cache=tmp_path)
    assert f"symlink to {outside.resolve()}, outside {models}" in message


def test_a_symlink_on_the_way_out_of_the_model_dir_is_refused(models: Path, tmp_path: Path) -> None:
    make_model(tmp_path / "elsewhere" / "secret")
    (models / "shelf").symlink_to(tmp_path / "elsewhere")
    assert "outside" in refused("shelf/secret", (models,), hf_cache=tmp_path)
    assert "outside" in refused(str(models / "shelf" / "secret"), (models,), hf_cache=tmp_path)


def test_a_file_symlink_out_of_the_model_folder_is_refused(models: Path, tmp_path: Path) -> None:
    loot = tmp_path / "elsewhere" / "loot.safetensors"
    loot.parent.mkdir()
    loot.write_bytes(b"\0")
    leaky = make_model(models / "leaky", weights=())
    (leaky / "model.safetensors").symlink_to(loot)
    message = refused("leaky", (models,), hf_cache=tmp_path)
    assert "model.safetensors of model 'leaky' is a symlink to" in message


def test_a_config_symlink_out_of_the_model_folder_is_refused(models: Path, tmp_path: Path) -> None:
    leaky = models / "leaky"
    leaky.mkdir()
    (leaky / "model.safetensors").write_bytes(b"\0")
    (tmp_path / "passwd").write_text("{}")
    (leaky / "config.json").symlink_to(tmp_path / "passwd")
    assert "config.json of model 'leaky' is a symlink" in refused("leaky", (models,))


def test_an_hf_snapshot_linking_out_of_the_cache_is_refused(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = _hf_repo(hub, "org/tiny")
    (tmp_path / "loot").write_bytes(b"\0")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "loot")
    assert "is a symlink to" in refused("org/tiny", (), hf_cache=hub)


def test_an_hf_ref_pointing_elsewhere_is_ignored(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    make_model(tmp_path / "target")
    refs = hub / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("../../../target")
    with pytest.raises(ModelNotFound) as info:
        resolve_model("org/tiny", (), hf_cache=hub)
    assert not isinstance(info.value, ModelRefused)


@pytest.mark.parametrize(
    "weights", [("pytorch_model.bin",), ("model.pt", "extra.pth"), ("weights.pkl",)]
)
def test_pickle_only_folders_are_refused(models: Path, tmp_path: Path, weights: tuple[str]) -> None:
    make_model(models / "pickled", weights=weights)
    message = refused("pickled", (models,), hf_cache=tmp_path)
    assert "only PyTorch pickle weights" in message and "convert it to safetensors" in message


def test_a_folder_without_weights_is_not_found(models: Path, tmp_path: Path) -> None:
    make_model(models / "bare", weights=())
    with pytest.raises(ModelNotFound, match=r"no \*\.safetensors weights"):
        resolve_model("bare", (models,), hf_cache=tmp_path)


def test_an_index_naming_files_elsewhere_is_refused(models: Path, tmp_path: Path) -> None:
    for target in ("../../loot.safetensors", "/etc/passwd", "pytorch_model.bin"):
        folder = make_model(models / "indexed", weights=("model-00001.safetensors",))
        index = {"weight_map": {"a": "model-00001.safetensors", "b": target}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        message = refused("indexed", (models,), hf_cache=tmp_path)
        assert f"names {target!r}: only .safetensors files beside it are read" in message


@pytest.mark.parametrize(
    ("file", "content", "key"),
    [
        ("config.json", {"model_type": "llama", "auto_map": {"AutoModel": "m.Model"}}, "auto_map"),
        ("config.json", {"model_type": "llama", "model_file": "evil.py"}, "model_file"),
        ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["t.T", None]}}, "auto_map"),
    ],
)
def test_remote_code_is_refused_by_default(
    models: Path, tmp_path: Path, file: str, content: dict[str, Any], key: str
) -> None:
    folder = make_model(models / "custom")
    (folder / file).write_text(json.dumps(content))
    message = refused("custom", (models,), hf_cache=tmp_path)
    assert f"asks to run its own code ({key} in {file})" in message


def test_an_odd_model_type_is_refused(models: Path, tmp_path: Path) -> None:
    make_model(models / "odd", config={"model_type": "llama.os"})
    assert "invalid model_type" in refused("odd", (models,), hf_cache=tmp_path)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "1 to 512 characters"),
        ("x" * 513, "1 to 512 characters"),
        ("tiny\x00", "control characters"),
        ("tiny\nINFO forged log line", "control characters"),
        ("a" * 300, "over 255 bytes"),
        ("\ud800", "not valid text"),
    ],
)
def test_bad_names_are_refused(models: Path, name: str, words: str) -> None:
    assert words in refused(name, (models,))


def test_an_unknown_model_says_where_it_looked(models: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model("org/missing", (models,), hf_cache=tmp_path)
    assert not isinstance(info.value, ModelRefused)
    assert str(models / "org/missing") in str(info.value)
    assert "Pomona downloads nothing" in str(info.value)


def test_a_symlink_loop_is_a_clear_error(models: Path, tmp_path: Path) -> None:
    (models / "loop").symlink_to(models / "loop")
    with pytest.raises(ModelNotFound, match="loop"):
        resolve_model("loop", (models,), hf_cache=tmp_path)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_name_resolves_inside_the_roots_or_gets_a_clear_error(name: str) -> None:
    assume(name != DEFAULT_MODEL)  # the built-in demo has a test of its own
    root = Path(__file__).resolve().parent / "data"
    try:
        found = resolve_model(name, (root,), hf_cache=root)
    except ModelNotFound as e:
        assert str(e)
    else:
        assert found.is_relative_to(root.resolve())
