"""A worker's model cache: stage folders received from other workers.

A stage folder is a valid mlx-lm model folder (config, tokenizer files, one
``model.safetensors`` with its index) holding only the tensors of one pipeline
stage, plus ``pomona-stage.json`` saying which model and stage it is. Folders
appear complete or not at all: they are written under a ``.partial`` name and
renamed once every chunk is verified. The least recently used folders are
evicted when the cache passes its limit, never one a runner uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pomona.safetensors_layout import layer_index

log = logging.getLogger(__name__)

STAGE_META = "pomona-stage.json"
STAGES_DIR = "stages"
PARTIAL = ".partial"
# Inside a stage folder: the weights; inside a ``.partial`` one, also the
# transfer's plan and the log of verified chunks (``tensor@offset digest``).
WEIGHTS = "model.safetensors"
PLAN_FILE = "transfer.json"
DONE_LOG = "chunks.log"
# Names of non-layer tensors that are the token embedding (used by the first
# stage, and by the last when the head is tied to it).
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|tok_embeddings|word_embeddings)\.")


@dataclass(frozen=True)
class StageKey:
    """Which tensors a stage needs: its layers and its place in the pipeline."""

    start: int
    end: int  # exclusive
    first: bool
    last: bool

    @classmethod
    def of(cls, start: int, end: int, rank: int, world_size: int) -> StageKey:
        return cls(start, end, rank == 0, rank == world_size - 1)

    @property
    def folder_name(self) -> str:
        role = {(True, True): "only", (True, False): "first", (False, True): "last"}
        return f"layers-{self.start}-{self.end}-{role.get((self.first, self.last), 'middle')}"

    def covers(self, other: StageKey) -> bool:
        return (
            self.start <= other.start
            and other.end <= self.end
            and (self.first or not other.first)
            and (self.last or not other.last)
        )


def tensors_for_stage(names: Sequence[str], key: StageKey) -> list[str]:
    """The tensors of ``names`` (a whole model's) that stage ``key`` loads.

    The same rule as ``worker.shard``: layer tensors inside ``[start, end)``;
    outside the layers, the embedding for the first stage, everything else
    (final norm, head) for the last, and the embedding for the last too when
    the head is tied to it (the checkpoint has no ``lm_head``).
    """
    tied = not any("lm_head" in n for n in names)
    out = []
    for name in names:
        idx = layer_index(name)
        if idx is not None:
            if key.start <= idx < key.end:
                out.append(name)
            continue
        if _EMBEDDING.search(name):
            if key.first or (key.last and tied):
                out.append(name)
        elif key.last:
            out.append(name)
    return out


def model_folder_name(model: str) -> str:
    """A directory name for ``model`` that cannot escape the cache and cannot collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", model)[:80].lstrip(".") or "model"
    return f"{readable}-{hashlib.sha256(model.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class StageFolder:
    path: Path
    model: str
    key: StageKey
    num_layers: int
    bytes: int


class StageCache:
    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes

    @property
    def stages_root(self) -> Path:
        return self.root / STAGES_DIR

    def folder(self, model: str, key: StageKey) -> Path:
        return self.stages_root / model_folder_name(model) / key.folder_name

    def folders(self, model: str | None = None) -> list[StageFolder]:
        """Complete stage folders, of ``model`` or of every model."""
        if not self.stages_root.is_dir():
            return []
        parents = (
            [self.stages_root / model_folder_name(model)]
            if model is not None
            else sorted(p for p in self.stages_root.iterdir() if p.is_dir())
        )
        out = []
        for parent in parents:
            if not parent.is_dir():
                continue
            for path in sorted(parent.iterdir()):
                if path.name.endswith(PARTIAL) or not (path / STAGE_META).is_file():
                    continue
                try:
                    out.append(read_stage_meta(path))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("ignoring stage folder %s: %s", path, e)
        return [f for f in out if model is None or f.model == model]

    def partials(self, model: str) -> list[Path]:
        """The ``.partial`` folders of ``model`` whose transfer has its plan written."""
        parent = self.stages_root / model_folder_name(model)
        if not parent.is_dir():
            return []
        return sorted(
            p for p in parent.iterdir() if p.name.endswith(PARTIAL) and (p / PLAN_FILE).is_file()
        )

    def find(self, model: str, key: StageKey) -> StageFolder | None:
        """A complete stage folder holding every tensor stage ``key`` of ``model`` needs."""
        for folder in self.folders(model):
            if folder.key.covers(key):
                return folder
        return None

    def touch(self, path: Path) -> None:
        """Marks a folder used now (what eviction orders by)."""
        meta = path / STAGE_META
        if meta.exists():
            now = time.time()
            os.utime(meta, (now, now))

    def used_bytes(self) -> int:
        return sum(f.bytes for f in self.folders())

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    def evict(self, incoming: int = 0, keep: Iterable[Path] = ()) -> list[Path]:
        """Removes least recently used folders until ``incoming`` more bytes fit the limit."""
        if not self.max_bytes:
            return []
        kept = {p.resolve() for p in keep}
        folders = sorted(self.folders(), key=lambda f: (f.path / STAGE_META).stat().st_mtime)
        used = sum(f.bytes for f in folders)
        removed = []
        for f in folders:
            if used + incoming <= self.max_bytes:
                break
            if f.path.resolve() in kept:
                continue
            log.info("evicting %s (%d bytes) from the model cache", f.path, f.bytes)
            shutil.rmtree(f.path, ignore_errors=True)
            used -= f.bytes
            removed.append(f.path)
        return removed


def write_stage_meta(
    path: Path, model: str, key: StageKey, num_layers: int, nbytes: int, tensors: list[str]
) -> None:
    meta = {
        "model": model,
        "start_layer": key.start,
        "end_layer": key.end,
        "first": key.first,
        "last": key.last,
        "num_layers": num_layers,
        "bytes": nbytes,
        "tensors": tensors,
    }
    (path / STAGE_META).write_text(json.dumps(meta, indent=1))


def read_stage_meta(path: Path) -> StageFolder:
    meta = json.loads((path / STAGE_META).read_text())
    key = StageKey(
        int(meta["start_layer"]), int(meta["end_layer"]), bool(meta["first"]), bool(meta["last"])
    )
    return StageFolder(path, str(meta["model"]), key, int(meta["num_layers"]), int(meta["bytes"]))


def read_chunks_log(path: Path) -> dict[str, str]:
    """``tensor@offset -> BLAKE3 hex`` of the chunks a ``chunks.log`` records verified.

    A line ``-key`` takes back a chunk that failed a later check.
    """
    done: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            if line.startswith("-"):
                done.pop(line[1:].strip(), None)
                continue
            key, _, digest = line.rstrip("\n").rpartition(" ")
            if key and len(digest) == 64:
                done[key] = digest
    return done
