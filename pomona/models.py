"""Finding a model by name, and reading its shape without loading it.

A model is a local folder in mlx-lm / Hugging Face layout (config.json,
safetensors with an index, tokenizer files), the name of such a folder inside
the configured model directories, a Hugging Face repo id already in the local
HF cache, or the built-in demo model. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pomona.config import DEFAULT_MODEL


class ModelNotFound(ValueError):
    pass


def default_hf_cache() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache)
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def resolve_model(
    name: str,
    model_dirs: tuple[Path, ...] = (),
    hf_cache: Path | None = None,
    demo_cache: Path | None = None,
) -> Path:
    """The folder of the model called ``name``, or ModelNotFound saying where we looked."""
    if not name or len(name) > 512 or "\x00" in name:
        raise ModelNotFound("a model name must be 1 to 512 characters")
    if name == DEFAULT_MODEL:
        from pomona.demo_model import ensure_demo_model

        return ensure_demo_model(demo_cache)
    looked: list[str] = []
    as_path = Path(name).expanduser()
    if as_path.is_absolute() or name.startswith("."):
        looked.append(str(as_path))
        if _is_model_dir(as_path):
            return as_path.resolve()
    for base in model_dirs:
        candidate = base / name
        looked.append(str(candidate))
        if _is_model_dir(candidate):
            return candidate.resolve()
    if name.count("/") == 1 and not as_path.is_absolute():
        repo = (hf_cache or default_hf_cache()) / ("models--" + name.replace("/", "--"))
        looked.append(f"the Hugging Face cache ({repo})")
        snapshot = _hf_snapshot(repo)
        if snapshot is not None:
            return snapshot
    raise ModelNotFound(
        f"unknown model {name!r}: no model folder (config.json + *.safetensors) at "
        + "; ".join(looked)
        + ". Pomona downloads nothing: copy the model there first"
    )


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hf_snapshot(repo: Path) -> Path | None:
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if _is_model_dir(snap):
            return snap
    snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    for snap in snapshots:
        if _is_model_dir(snap):
            return snap
    return None


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    layer_bytes: tuple[int, ...]
    other_bytes: int
    max_context: int
    vocab_size: int

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes


def inspect_model(path: Path) -> ModelShape:
    """Layer sizes from the safetensors headers; no tensor is read."""
    from pomona.worker.shard import layer_index

    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", {})
    num_layers = int(config.get("num_hidden_layers") or text.get("num_hidden_layers") or 0)
    per_layer = [0] * num_layers
    other = 0
    for file in sorted(path.glob("*.safetensors")):
        for name, nbytes in _tensor_sizes(file):
            idx = layer_index(name)
            if idx is not None and idx < num_layers:
                per_layer[idx] += nbytes
            else:
                other += nbytes
    max_context = int(
        config.get("max_position_embeddings") or text.get("max_position_embeddings") or 0
    )
    return ModelShape(
        model_type=str(config.get("model_type", "")),
        num_layers=num_layers,
        layer_bytes=tuple(per_layer),
        other_bytes=other,
        max_context=max_context,
        vocab_size=int(config.get("vocab_size") or text.get("vocab_size") or 0),
    )


def _tensor_sizes(file: Path) -> list[tuple[str, int]]:
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100 << 20:
            raise ValueError(f"{file} has an implausible safetensors header")
        header = json.loads(f.read(size))
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out.append((name, int(end) - int(start)))
    return out
