"""Finding a model by name, safely.

A model is a local folder in mlx-lm / Hugging Face layout (config.json,
safetensors with an index, tokenizer files), the name of such a folder inside
the configured model directories, a Hugging Face repo id already in the local
HF cache, or the built-in demo model. Nothing is downloaded, nothing outside
those places is reached (no '..', no symlink out), only safetensors are read,
and no code shipped with a model runs unless the operator allows it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from pomona.config import DEFAULT_MODEL

MAX_NAME_CHARS = 512
# Weight formats that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Config keys that make transformers or mlx-lm import code shipped with the model.
REMOTE_CODE_KEYS = ("auto_map", "model_file")
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MODEL_TYPE = re.compile(r"[A-Za-z0-9_]{1,64}")


class ModelNotFound(ValueError):
    pass


class ModelRefused(ModelNotFound):
    """A model name or folder that Pomona will not load; the message says why and what to do."""


def default_hf_cache() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def check_model_name(name: str) -> None:
    """Refuse names that are empty, over-long, or hold control characters or '..'."""
    if not name or len(name) > MAX_NAME_CHARS:
        raise ModelRefused(
            f"a model name must be 1 to {MAX_NAME_CHARS} characters, not {len(name)}"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ModelRefused(f"model name {name!r} contains control characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ModelRefused(f"model name {name!r} is not valid text") from None
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ModelRefused(
            f"model name {name!r} contains '..': name a folder inside the model directories"
        )
    if any(len(part.encode()) > 255 for part in parts):
        raise ModelRefused(f"model name {name[:40]!r}... has a path component over 255 bytes")


def resolve_model(
    name: str,
    model_dirs: tuple[Path, ...] = (),
    hf_cache: Path | None = None,
    demo_cache: Path | None = None,
    *,
    allow_remote_code: bool = False,
) -> Path:
    """The real path of the model folder called ``name``, checked safe to load.

    ``name`` is a folder inside one of ``model_dirs`` (relative, or absolute within
    one), a Hugging Face repo id in ``hf_cache``, or the built-in demo. Raises
    ModelRefused for names or folders that could escape those places, pickle-only
    weights, or model code (unless ``allow_remote_code``); ModelNotFound otherwise.
    """
    check_model_name(name)
    if name == DEFAULT_MODEL:
        from pomona.demo_model import ensure_demo_model

        return ensure_demo_model(demo_cache)
    hf_root = hf_cache or default_hf_cache()
    try:
        path = _find(name, model_dirs, hf_root)
        check_weight_files(path, name)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise ModelNotFound(f"cannot open model {name!r}: {e}") from None
    check_remote_code(path, allow_remote_code, name)
    return path


def _find(name: str, model_dirs: tuple[Path, ...], hf_root: Path) -> Path:
    as_path = Path(name)
    if as_path.is_absolute():
        for root in (*model_dirs, hf_root):
            rel = _relative_to(as_path, root)
            if rel is not None:
                found = _inside(root, rel, name)
                if found is None:
                    raise ModelNotFound(f"no model folder (with config.json) at {name}")
                return found
        dirs = ", ".join(str(d) for d in model_dirs) or "none configured"
        raise ModelRefused(
            f"{name} is outside the model directories ({dirs}) and the Hugging Face cache: "
            "give the worker its parent folder with --model-dir, or move the model there"
        )
    looked: list[str] = []
    for base in model_dirs:
        looked.append(str(base / name))
        found = _inside(base, as_path, name)
        if found is not None:
            return found
    if _HF_REPO_ID.fullmatch(name):
        repo = "models--" + name.replace("/", "--")
        looked.append(f"the Hugging Face cache ({hf_root / repo})")
        found = _hf_snapshot(hf_root, repo, name)
        if found is not None:
            return found
    raise ModelNotFound(
        f"unknown model {name!r}: no model folder (config.json + *.safetensors) at "
        + "; ".join(looked or ["(no model directories configured)"])
        + ". Pomona downloads nothing: copy the model there first"
    )


def _relative_to(path: Path, root: Path) -> Path | None:
    for base in (root, root.resolve()):
        if path.is_relative_to(base):
            return path.relative_to(base)
    return None


def _inside(root: Path, rel: Path, name: str) -> Path | None:
    """The real path of ``root/rel`` if it is a folder with config.json, refusing escapes.

    Symlinks are followed only while they stay inside ``root``: the folder itself, any
    folder on the way, and every file in the model folder.
    """
    candidate = root / rel
    if not os.path.lexists(candidate):
        return None
    root_real = root.resolve()
    real = candidate.resolve()
    if not real.is_relative_to(root_real):
        raise ModelRefused(
            f"model {name!r} leads through a symlink to {real}, outside {root}: "
            "move the model into that folder or add its folder with --model-dir"
        )
    if not (real / "config.json").is_file():
        return None
    for entry in real.iterdir():
        if entry.is_symlink() and not entry.resolve().is_relative_to(root_real):
            raise ModelRefused(
                f"{entry.name} of model {name!r} is a symlink to {entry.resolve()}, outside "
                f"{root}: copy the file itself into the model folder"
            )
    return real


def _hf_snapshot(hf_root: Path, repo: str, name: str) -> Path | None:
    snapshots = hf_root / repo / "snapshots"
    ref = hf_root / repo / "refs" / "main"
    commits: list[str] = []
    if ref.is_file() and _COMMIT.fullmatch(head := ref.read_text().strip()):
        commits.append(head)
    if snapshots.is_dir():
        commits += sorted(p.name for p in snapshots.iterdir())
    for commit in commits:
        found = _inside(hf_root, Path(repo) / "snapshots" / commit, name)
        if found is not None and any(found.glob("*.safetensors")):
            return found
    return None


def check_weight_files(path: Path, name: str = "") -> None:
    """Refuse a folder whose weights are not safetensors, or whose index points elsewhere."""
    name = name or str(path)
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelRefused(
                f"model {name!r} has only PyTorch pickle weights ({', '.join(pickles[:3])}); "
                "Pomona reads only safetensors, which cannot run code when loaded: convert "
                "it to safetensors on a machine you trust"
            )
        raise ModelNotFound(f"model {name!r} has config.json but no *.safetensors weights")
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        files = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelRefused(f"model {name!r} has an unreadable {index.name}") from None
    for file in sorted(map(str, files)):
        if "/" in file or "\\" in file or not file.endswith(".safetensors"):
            raise ModelRefused(
                f"{index.name} of model {name!r} names {file!r}: only .safetensors files "
                "beside it are read"
            )
        if not (path / file).is_file():
            raise ModelNotFound(f"model {name!r} lacks {file}, named in {index.name}")


def check_remote_code(path: Path, allow_remote_code: bool = False, name: str = "") -> None:
    """Refuse models that ship code of their own (``auto_map``, ``model_file``), unless allowed."""
    name = name or str(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelRefused(f"model {name!r} has an unreadable config.json") from None
    if not isinstance(config, dict):
        raise ModelRefused(f"config.json of model {name!r} is not a JSON object")
    model_type = config.get("model_type", "")
    if not isinstance(model_type, str) or not _MODEL_TYPE.fullmatch(model_type):
        raise ModelRefused(f"model {name!r} has an invalid model_type {model_type!r}")
    if allow_remote_code:
        return
    for file in ("config.json", "tokenizer_config.json"):
        data = config if file == "config.json" else _json_or_empty(path / file)
        keys = [k for k in REMOTE_CODE_KEYS if k in data]
        if keys:
            raise ModelRefused(
                f"model {name!r} asks to run its own code ({keys[0]} in {file}); Pomona runs "
                "no model code unless the operator allows it (allow_remote_code)"
            )


def _json_or_empty(file: Path) -> dict[str, object]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
