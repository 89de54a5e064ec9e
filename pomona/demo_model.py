"""Pomona's built-in demo model, ready to load with mlx-lm.

A tiny llama trained by ``scripts/train_demo_model.py`` on simple English that the project
writes itself. Its weights ship inside the package as one file (``pomona/demo/``);
:func:`ensure_demo_model` lays them out in a cache directory in mlx-lm's sharded layout,
split by layer, so that a worker serving a range of layers reads only the shards that
hold them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "pomona-demo"
# SHA-256 of pomona/demo/model.safetensors; scripts/train_demo_model.py prints it.
DEMO_WEIGHTS_SHA256 = "a33f4ee36254c138d130831d38f49beb0111763bd9b0f441281550ef1736c2d3"
NUM_SHARDS = 3
SHIPPED_DIR = Path(__file__).resolve().parent / "demo"
SHIPPED_WEIGHTS = "model.safetensors"
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
INDEX_FILE = "model.safetensors.index.json"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DemoModelError(RuntimeError):
    """The shipped demo model is missing or damaged."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pomona" / "models"


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`ensure_demo_model` puts the model: one folder per weights version."""
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / f"{DEMO_MODEL_NAME}-{DEMO_WEIGHTS_SHA256[:12]}"


def shard_file_name(index: int, count: int) -> str:
    """mlx-lm's name for shard ``index`` (0-based) of ``count``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(names: Iterable[str], num_layers: int, num_shards: int) -> dict[str, str]:
    """Map each tensor name to its shard file, splitting the layers into even ranges.

    The embedding goes with the first layers and the final norm (and any ``lm_head``)
    with the last, so every shard holds one contiguous range of layers.
    """
    if not 1 <= num_shards <= num_layers:
        raise ValueError(f"num_shards must be between 1 and {num_layers}, got {num_shards}")
    plan = {}
    for name in names:
        match = _LAYER.match(name)
        if match is not None:
            shard = int(match.group(1)) * num_shards // num_layers
        elif name.startswith("model.embed_tokens."):
            shard = 0
        else:
            shard = num_shards - 1
        plan[name] = shard_file_name(shard, num_shards)
    return dict(sorted(plan.items()))


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """The tensors of one ``.safetensors`` file, by name."""
    tensors = mx.load(str(path))
    if not isinstance(tensors, dict):
        raise DemoModelError(f"{path} is not a safetensors file of named tensors")
    return tensors


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return a folder holding the demo model in mlx-lm layout, writing it if needed.

    ``cache_dir`` is the folder that holds cached models (default
    ``~/.cache/pomona/models``); the model goes in a ``pomona-demo-<hash>`` folder
    inside it. The folder is built in a temporary sibling and renamed into place, so it
    is either complete or absent; calling again returns it untouched.
    """
    target = demo_model_dir(cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_model(staging)
        if _is_complete(target):  # another process finished first; its copy is as good
            return target
        if target.exists():
            logger.warning("replacing incomplete demo model at %s", target)
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote demo model to %s", target)
    return target


def _write_model(out: Path) -> None:
    weights_path = SHIPPED_DIR / SHIPPED_WEIGHTS
    _verify(weights_path)
    for name in COPIED_FILES:
        source = SHIPPED_DIR / name
        if not source.is_file():
            raise DemoModelError(f"{source} is missing: reinstall pomona")
        shutil.copyfile(source, out / name)
    num_layers = json.loads((SHIPPED_DIR / "config.json").read_text())["num_hidden_layers"]
    weights = load_safetensors(weights_path)
    weight_map = plan_shards(weights, num_layers, NUM_SHARDS)
    for shard in sorted(set(weight_map.values())):
        tensors = {k: weights[k] for k, v in weight_map.items() if v == shard}
        mx.save_safetensors(str(out / shard), tensors, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": weight_map,
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _verify(weights_path: Path) -> None:
    if not weights_path.is_file():
        raise DemoModelError(f"{weights_path} is missing: reinstall pomona")
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if digest != DEMO_WEIGHTS_SHA256:
        raise DemoModelError(
            f"{weights_path} has SHA-256 {digest}, expected {DEMO_WEIGHTS_SHA256}: "
            "reinstall pomona (after retraining, update DEMO_WEIGHTS_SHA256)"
        )


def _is_complete(folder: Path) -> bool:
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    needed = set(index.get("weight_map", {}).values()) | set(COPIED_FILES)
    return bool(index.get("weight_map")) and all((folder / n).is_file() for n in needed)
