"""What a worker (or the coordinator) holds and may serve to workers: models and stage folders.

A complete model is a folder in the worker's model directories or its Hugging
Face cache (found by ``pomona.models``, with all its checks); a partial one is
the stage folders in its model cache. Only tensors named in a safetensors
header of those folders and only config and tokenizer files are ever served:
a name a requester gives is looked up in these tables, never joined to a path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pomona.models import ModelNotFound, ModelRefused, default_hf_cache
from pomona.safetensors_layout import (
    LayoutError,
    TensorLocation,
    layer_index,
    read_layout,
    weight_map,
)
from pomona.stage_cache import (
    DONE_LOG,
    PLAN_FILE,
    WEIGHTS,
    StageCache,
    StageKey,
    read_chunks_log,
)

log = logging.getLogger(__name__)

# The files besides the weights that an mlx-lm model folder needs.
SMALL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.json",
        "chat_template.jinja",
    }
)
MAX_SMALL_FILE_BYTES = 15 << 20


@dataclass(frozen=True)
class Holding:
    """The tensors of one model held here, and where each lies."""

    model: str
    complete: bool
    num_layers: int
    tensors: dict[str, TensorLocation]
    # Where config and tokenizer files are read from.
    files_dir: Path | None
    stages: tuple[StageKey, ...] = field(default=())

    @property
    def bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors.values())

    def small_files(self) -> dict[str, int]:
        if self.files_dir is None:
            return {}
        out = {}
        for name in sorted(SMALL_FILES):
            path = self.files_dir / name
            if path.is_file():
                out[name] = path.stat().st_size
        return out


@dataclass(frozen=True)
class PartialTensor:
    """A tensor of a stage still being received here: only its verified chunks are served."""

    location: TensorLocation
    folder: Path
    chunk_bytes: int
    # Offset -> BLAKE3 (hex) of each chunk verified so far.
    digests: dict[int, str]

    def chunk(self, offset: int, length: int) -> str | None:
        """The digest of the verified chunk ``[offset, offset + length)``; None if not here."""
        if length != min(self.chunk_bytes, self.location.info.nbytes - offset):
            return None
        return self.digests.get(offset)


class ModelStore:
    """The models held here: whole in ``model_dirs`` and the HF cache, and stage
    folders in ``cache`` (a worker's; None for a coordinator, which fetches none)."""

    def __init__(
        self,
        resolve: Callable[[str], Path],
        model_dirs: tuple[Path, ...],
        cache: StageCache | None,
        hf_cache: Path | None = None,
    ) -> None:
        self._resolve = resolve
        self.model_dirs = model_dirs
        self.cache = cache
        self.hf_cache = hf_cache or default_hf_cache()

    def holding(self, model: str) -> Holding:
        """What is held here of ``model``; ModelNotFound when nothing."""
        try:
            path: Path | None = self._resolve(model)
        except ModelRefused:
            raise
        except ModelNotFound:
            path = None
        if path is not None:
            return complete_holding(model, path)
        folders = self.cache.folders(model) if self.cache is not None else []
        if not folders:
            raise ModelNotFound(f"no part of model {model!r} is held here")
        tensors: dict[str, TensorLocation] = {}
        for f in folders:
            tensors.update(read_layout(f.path / "model.safetensors"))
        return Holding(
            model,
            False,
            folders[0].num_layers,
            tensors,
            folders[0].path,
            tuple(f.key for f in folders),
        )

    def partial_tensors(self, model: str) -> dict[str, PartialTensor]:
        """Tensors of ``model`` in ``.partial`` stage folders here, with their verified chunks."""
        out: dict[str, PartialTensor] = {}
        for folder in self.cache.partials(model) if self.cache is not None else []:
            try:
                plan = json.loads((folder / PLAN_FILE).read_text())
                if plan.get("model") != model:
                    continue
                chunk_bytes = int(plan["chunk_bytes"])
                layout = read_layout(folder / WEIGHTS)
                done = read_chunks_log(folder / DONE_LOG)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.debug("not serving from %s: %s", folder, e)
                continue
            by_tensor: dict[str, dict[int, str]] = {}
            for key, digest in done.items():
                tensor, _, offset = key.rpartition("@")
                if offset.isdigit():
                    by_tensor.setdefault(tensor, {})[int(offset)] = digest
            for name, loc in layout.items():
                if name not in out:
                    out[name] = PartialTensor(loc, folder, chunk_bytes, by_tensor.get(name, {}))
        return out

    def held(self, model: str = "") -> list[Holding]:
        """Every model held here, complete ones first; unreadable folders are skipped.

        With ``model``, only that model, looked up by the name as given (a path, a
        repo id, the demo) as ``Load`` would resolve it: what planning needs,
        without reading the headers of every other model here.
        """
        if model:
            try:
                return [self.holding(model)]
            except (ModelNotFound, OSError, ValueError):
                return []
        return self._held(self._complete_names())

    def _held(self, names: list[str]) -> list[Holding]:
        out = []
        for name in names:
            try:
                out.append(self.holding(name))
            except (ModelNotFound, OSError, ValueError) as e:
                log.debug("not listing %s: %s", name, e)
        cached = self.cache.folders() if self.cache is not None else []
        partial = sorted({f.model for f in cached} - set(names))
        for name in partial:
            try:
                out.append(self.holding(name))
            except (ModelNotFound, OSError, ValueError) as e:
                log.debug("not listing %s: %s", name, e)
        return out

    def _complete_names(self) -> list[str]:
        """Names of model folders in the model directories (one or two levels) and HF cache."""
        names = []
        for root in self.model_dirs:
            if not root.is_dir():
                continue
            for child in sorted(root.iterdir()):
                if child.name == "stages" and self.cache is not None and root == self.cache.root:
                    continue
                if _is_model(child):
                    names.append(child.name)
                elif child.is_dir() and not child.name.startswith("."):
                    names += [
                        f"{child.name}/{g.name}" for g in sorted(child.iterdir()) if _is_model(g)
                    ]
        if self.hf_cache.is_dir():
            for repo in sorted(self.hf_cache.glob("models--*--*")):
                names.append(repo.name.removeprefix("models--").replace("--", "/", 1))
        return list(dict.fromkeys(names))


def _is_model(path: Path) -> bool:
    try:
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    except OSError:
        return False


def complete_holding(model: str, path: Path) -> Holding:
    wmap = weight_map(path)
    tensors: dict[str, TensorLocation] = {}
    for file in sorted(set(wmap.values())):
        layout = read_layout(path / file)
        for name, loc in layout.items():
            if wmap.get(name) == file:
                tensors[name] = loc
    missing = sorted(set(wmap) - set(tensors))
    if missing:
        raise LayoutError(f"model {model!r}: the index names tensors its files lack: {missing[:3]}")
    indices = [i for i in map(layer_index, tensors) if i is not None]
    num_layers = max(indices) + 1 if indices else _config_layers(path)
    # Reading in file order makes a stage's reads sequential at the source.
    ordered = dict(sorted(tensors.items(), key=lambda kv: (str(kv[1].path), kv[1].start)))
    return Holding(model, True, num_layers, ordered, path)


def _config_layers(path: Path) -> int:
    try:
        return int(json.loads((path / "config.json").read_text()).get("num_hidden_layers", 0))
    except (OSError, ValueError, TypeError):
        return 0
