"""The benchmark's model: a ~101M-parameter qwen2 with random weights, cached.

qwen2 because mlx-lm's own ``pipeline()`` supports it, so the same folder
serves all three systems. Written by the tests' model factory (the same
safetensors-per-layer-range layout and byte-level BPE tokenizer the tests use).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

ARCH = "qwen2"
NUM_LAYERS = 8
OVERRIDES: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pomona" / "bench"


# A quarter of the width: for prompts of thousands of tokens on a slow CPU.
SMALL: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def model_folder(
    cache_dir: Path, dtype: str, shape: dict[str, Any] | None = None, num_layers: int = NUM_LAYERS
) -> Path:
    o = {**OVERRIDES, **(shape or {})}
    name = f"h{o['hidden_size']}-i{o['intermediate_size']}-l{num_layers}"
    if o["max_position_embeddings"] != OVERRIDES["max_position_embeddings"]:
        name += f"-c{o['max_position_embeddings']}"
    return cache_dir / f"{ARCH}-{name}-{dtype}"


def ensure_model(
    cache_dir: Path, dtype: str, shape: dict[str, Any] | None = None, num_layers: int = NUM_LAYERS
) -> Path:
    """The model folder, written on first use (a few seconds; ~50 MB a float32 layer).

    ``shape``: config entries replacing the default ones (``SMALL``, a longer
    ``max_position_embeddings``).
    """
    folder = model_folder(cache_dir, dtype, shape, num_layers)
    if (folder / "tokenizer.json").exists():
        return folder
    sys.path.insert(0, str(REPO / "tests"))
    from modelfactory import make_model

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make_model(
        partial,
        ARCH,
        num_layers=num_layers,
        shards=max(2, num_layers // 4),
        dtype=dtype,
        overrides={**OVERRIDES, **(shape or {})},
    )
    partial.rename(folder)
    return folder


def parameter_count(folder: Path) -> int:
    """Parameters in the folder's safetensors files, from their headers alone.

    A quantized weight packs 32 / bits parameters into each uint32; its scales
    and biases are not parameters of the model.
    """
    config = json.loads((folder / "config.json").read_text())
    bits = (config.get("quantization") or {}).get("bits", 0)
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, v in header.items():
            if name == "__metadata__" or (bits and name.endswith((".scales", ".biases"))):
                continue
            packed = 32 // bits if bits and v["dtype"] == "U32" else 1
            total += math.prod(v["shape"]) * packed
    return total
