"""Load one contiguous range of an mlx-lm model's layers.

A stage of the pipeline holds layers ``[start, end)`` of the model. It builds
the full mlx-lm model lazily (no array is evaluated), replaces the layers it
does not hold with pass-throughs, reads only the safetensors files that hold
its tensors, and wraps the first and last layer it holds with ``recv`` from the
previous stage and ``send`` to the next. The model's own ``__call__`` then runs
the stage: embeddings and head are used only where they are needed, because
MLX evaluates lazily and the stage evaluates only what it sends or samples.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, load_config, load_model

from pomona.model_profile import read_safetensors_header
from pomona.safetensors_layout import layer_index, weight_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """Which layers this process holds and where its neighbours are."""

    start: int
    end: int  # exclusive
    rank: int = 0
    world_size: int = 1
    # Tensor parallel: every rank holds a slice of every layer ([start, end) is
    # all of them), embeds its input and computes the logits.
    tensor: bool = False

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1


@dataclass
class LoadedShard:
    model: nn.Module
    config: dict[str, Any]
    spec: StageSpec
    files: list[str]
    weights_bytes: int
    # Set by the send wrapper on every call: what this stage sends on.
    sent: list[mx.array] = field(default_factory=list)


class PassThrough(nn.Module):
    """Stands in for a layer held by another stage.

    Copies the layer's plain attributes (``use_sliding``, ``is_sliding``, ...)
    because some models read them in their layer loop.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
                object.__setattr__(self, key, value)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return x


class StageBoundary(nn.Module):
    """Wraps the first and/or last layer a stage holds with recv/send.

    What crosses a boundary always has the ``wire`` dtype (the dtype of the
    model's embeddings, which every stage derives from the checkpoint alone),
    so sender and receiver agree on its size in bytes: a disagreement would
    leave the ring reading one message as part of another.
    """

    def __init__(
        self,
        layer: nn.Module,
        recv_from: int | None,
        send_to: int | None,
        sent: list[mx.array],
        wire: mx.Dtype | None = None,
    ):
        super().__init__()
        self.layer = layer
        self._recv_from = recv_from
        self._send_to = send_to
        self._sent = sent
        self._wire = wire
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
                object.__setattr__(self, key, value)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if self._recv_from is not None:
            template = x if self._wire is None else x.astype(self._wire)
            x = mx.distributed.recv_like(template, self._recv_from)
        y = self.layer(x, *args, **kwargs)
        if self._send_to is not None:
            if self._wire is not None and y.dtype != self._wire:
                y = y.astype(self._wire)
            y = mx.distributed.send(y, self._send_to)
            self._sent.append(y)
        return y


def layer_list(model: nn.Module) -> list[nn.Module]:
    """The model's own list of decoder blocks, to be edited in place.

    mlx-lm models expose ``layers`` as a property, which some return as a
    copy (``pipeline_layers``); the list itself lives on an inner module.
    """
    todo: list[nn.Module] = [model]
    while todo:
        module = todo.pop(0)
        layers = module.get("layers")
        if isinstance(layers, list) and layers and isinstance(layers[0], nn.Module):
            return layers
        todo.extend(v for v in module.values() if isinstance(v, nn.Module))
    raise ValueError(
        f"{type(model).__module__} has no list of layers; "
        "Pomona can only pipeline decoder models whose blocks are a list"
    )


_SAFETENSORS_FLOATS = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


def checkpoint_dtypes(model_path: Path, files: list[str]) -> dict[str, mx.Dtype]:
    """The stored dtype of every floating tensor in ``files``, from their headers."""
    dtypes: dict[str, mx.Dtype] = {}
    for file in files:
        for name, (stored, _, _) in read_safetensors_header(model_path / file).items():
            dtype = _SAFETENSORS_FLOATS.get(stored)
            if dtype is not None:
                dtypes[name] = dtype
    return dtypes


def files_for_stage(wmap: dict[str, str], num_layers: int, spec: StageSpec) -> list[str]:
    """The safetensors files holding the tensors of this stage.

    Layer tensors are needed only inside ``[start, end)``. Tensors outside the
    layers (embeddings, final norm, head) are needed by the first and last
    stage only; a middle stage reads none of them.
    """
    needed = set()
    for name, file in wmap.items():
        idx = layer_index(name)
        if idx is None:
            if spec.is_first or spec.is_last:
                needed.add(file)
        elif spec.start <= idx < spec.end:
            needed.add(file)
    return sorted(needed)


def carve(model: nn.Module, spec: StageSpec) -> None:
    """Replace the layers outside ``[start, end)`` with pass-throughs."""
    layers = layer_list(model)
    if not 0 <= spec.start < spec.end <= len(layers):
        raise ValueError(
            f"layer range [{spec.start}, {spec.end}) is outside the model's {len(layers)} layers"
        )
    for i, layer in enumerate(layers):
        if not spec.start <= i < spec.end:
            layers[i] = PassThrough(layer)


def wire_dtype(model: nn.Module) -> mx.Dtype | None:
    """The dtype of the model's embeddings' output, built but never evaluated."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            return module(mx.zeros((1, 1), dtype=mx.int32)).dtype
    return None


def place_boundaries(model: nn.Module, spec: StageSpec, sent: list[mx.array]) -> None:
    """Wrap the stage's first layer with recv and its last with send."""
    if spec.world_size == 1:
        return
    wire = wire_dtype(model)
    layers = layer_list(model)
    recv_from = None if spec.is_first else spec.rank - 1
    send_to = None if spec.is_last else spec.rank + 1
    if spec.start == spec.end - 1:
        layers[spec.start] = StageBoundary(layers[spec.start], recv_from, send_to, sent, wire)
        return
    if recv_from is not None:
        layers[spec.start] = StageBoundary(layers[spec.start], recv_from, None, sent, wire)
    if send_to is not None:
        layers[spec.end - 1] = StageBoundary(layers[spec.end - 1], None, send_to, sent, wire)


def make_stage_cache(model: nn.Module, spec: StageSpec) -> list[Any]:
    """Fresh KV caches for every layer index, real only for the layers held."""
    if hasattr(model, "make_cache"):
        caches = list(model.make_cache())
    else:
        from mlx_lm.models.cache import KVCache

        caches = [KVCache() for _ in layer_list(model)]
    owned = {i: caches[i] for i in range(spec.start, spec.end)}
    return alias_caches(owned, [cache_kind(c) for c in caches], spec)


def cache_kind(cache: Any) -> tuple[str, Any]:
    """What distinguishes caches for masks: full or sliding, and the window.

    Named by mlx-lm's class, so that Pomona's subclasses of its caches count
    as the caches they extend."""
    cls = next((t for t in type(cache).__mro__ if t.__module__.startswith("mlx_lm")), type(cache))
    return cls.__name__.removeprefix("Batch"), getattr(cache, "max_size", None)


def alias_caches(owned: dict[int, Any], kinds: list[tuple[str, Any]], spec: StageSpec) -> list[Any]:
    """A cache for every layer index, built from the caches of the layers held.

    Models build attention masks from the cache of a fixed layer index (the
    first layer, or the first of each attention kind). For a layer held
    elsewhere this puts a held cache of the same kind there, so the mask sees
    the right offset; pass-through layers never touch a cache.
    """
    by_kind: dict[tuple[str, Any], Any] = {}
    for i in range(spec.start, spec.end):
        by_kind.setdefault(cache_kind(owned[i]), owned[i])
    first = owned[spec.start]
    return [
        owned[i] if spec.start <= i < spec.end else by_kind.get(kind, first)
        for i, kind in enumerate(kinds)
    ]


def stage_caches(caches: list[Any], spec: StageSpec) -> list[Any]:
    """The caches this stage owns (for evaluation and trimming)."""
    return caches[spec.start : spec.end]


def load_stage(
    model_path: Path,
    spec: StageSpec,
    *,
    progress: Callable[[float], None] | None = None,
    trust_remote_code: bool = False,
) -> LoadedShard:
    """Load layers ``[start, end)`` of the model at ``model_path``.

    Reads only the safetensors files that hold this stage's tensors and
    evaluates only the parameters the stage uses.
    """
    config = load_config(model_path)
    wmap = weight_map(model_path)
    files = files_for_stage(wmap, _num_layers(config, wmap), spec)
    loaded_names: set[str] = set()

    def build(args: Any) -> nn.Module:
        model_class, _ = _get_classes(config)
        model = model_class(args)
        carve(model, spec)
        module_paths = {name for name, _ in model.named_modules()}
        original = model.sanitize if hasattr(model, "sanitize") else (lambda w: w)

        def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
            weights = original(weights)
            kept = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] in module_paths}
            loaded_names.update(kept)
            return kept

        object.__setattr__(model, "sanitize", sanitize)
        return model

    def classes(config: dict) -> tuple[Any, Any]:
        _, args_class = _get_classes(config)
        return build, args_class

    with _staged(model_path, files) as staging:
        model, config = load_model(
            staging,
            lazy=True,
            strict=False,
            get_model_classes=classes,
            trust_remote_code=trust_remote_code,
        )

    params = _used_parameters(model, spec)
    missing = [name for name in params if name not in loaded_names]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint at {model_path} lacks {len(missing)} tensors: {shown}")
    _evaluate(params, progress)
    _match_stored_dtypes(model, params, checkpoint_dtypes(model_path, files))
    weights_bytes = sum(p.nbytes for p in params.values())
    sent: list[mx.array] = []
    place_boundaries(model, spec, sent)
    log.info(
        "loaded layers [%d, %d) of %s from %d files (%.1f MB)",
        spec.start,
        spec.end,
        model_path.name,
        len(files),
        weights_bytes / 1e6,
    )
    return LoadedShard(model, config, spec, files, weights_bytes, sent)


@contextlib.contextmanager
def _staged(model_path: Path, files: list[str]) -> Iterator[Path]:
    """A folder holding only ``files`` of the model (and its config).

    mlx-lm's loader reads every model*.safetensors in a folder.
    """
    with tempfile.TemporaryDirectory(prefix="pomona-stage-") as tmp:
        staging = Path(tmp)
        (staging / "config.json").symlink_to((model_path / "config.json").resolve())
        for i, name in enumerate(files):
            (staging / f"model-{i:05d}.safetensors").symlink_to((model_path / name).resolve())
        yield staging


def tensor_refusal(config: dict[str, Any], world_size: int) -> str:
    """Why this model cannot be split into ``world_size`` tensor slices ("" if it can).

    mlx-lm's ``shard()`` divides attention heads, key/value heads and the MLP
    width by the group's size and shards no embedding or head.
    """
    model_class, _ = _get_classes(config)
    kind = config.get("model_type", "?")
    if not hasattr(model_class, "shard"):
        return (
            f"mlx-lm's {kind} model has no shard(), so it cannot be split by tensor "
            "parallelism: use --parallel pipeline (or auto)"
        )
    text = config.get("text_config", config)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = int(text.get(key) or 0)
        if value and value % world_size:
            return (
                f"{kind}'s {key} ({value}) does not divide among {world_size} ranks: "
                f"use a number of workers that divides it, or --parallel pipeline"
            )
    return ""


def load_tensor_slice(
    model_path: Path,
    spec: StageSpec,
    group: Any,
    *,
    progress: Callable[[float], None] | None = None,
    trust_remote_code: bool = False,
) -> LoadedShard:
    """This rank's slice of every layer, as mlx-lm's ``sharded_load`` makes it.

    The model is built and its weights read lazily, ``shard()`` replaces each
    linear layer with this rank's slice of it, and only then is anything
    evaluated: the rank materializes its slices (and the embedding and head,
    which mlx-lm does not shard), never the whole model.
    """
    config = load_config(model_path)
    refusal = tensor_refusal(config, spec.world_size)
    if refusal:
        raise ValueError(refusal)
    files = sorted(set(weight_map(model_path).values()))
    with _staged(model_path, files) as staging:
        model, config = load_model(staging, lazy=True, trust_remote_code=trust_remote_code)
    model.shard(group)
    params = dict(tree_flatten(model.parameters()))
    _evaluate(params, progress)
    weights_bytes = sum(p.nbytes for p in params.values())
    log.info(
        "loaded slice %d of %d of every layer of %s (%.1f MB)",
        spec.rank,
        spec.world_size,
        model_path.name,
        weights_bytes / 1e6,
    )
    return LoadedShard(model, config, spec, files, weights_bytes)


def _num_layers(config: dict[str, Any], wmap: dict[str, str]) -> int:
    indices = [i for i in (layer_index(n) for n in wmap) if i is not None]
    return max(indices) + 1 if indices else int(config.get("num_hidden_layers", 0))


def _used_parameters(model: nn.Module, spec: StageSpec) -> dict[str, mx.array]:
    """Parameters this stage evaluates: its layers, and the rest where needed.

    The first stage needs the embeddings; the last needs everything else
    outside the layers (final norm, head), and the embeddings too when the
    head is tied to them. A middle stage needs only its layers.
    """
    params = dict(tree_flatten(model.parameters()))
    embeddings = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))
    }
    tied = not any("lm_head" in name for name in params)
    used = {}
    for name, value in params.items():
        idx = layer_index(name)
        if idx is not None:
            if spec.start <= idx < spec.end:
                used[name] = value
            continue
        is_embedding = name.rsplit(".", 1)[0] in embeddings
        if (is_embedding and (spec.is_first or (spec.is_last and tied))) or (
            not is_embedding and spec.is_last
        ):
            used[name] = value
    return used


def _match_stored_dtypes(
    model: nn.Module, used: dict[str, mx.array], stored: dict[str, mx.Dtype]
) -> None:
    """Give the parameters this stage never loads the checkpoint's dtypes.

    A stage still builds (never evaluates) the embedding of its placeholder
    inputs, and what it receives from the previous stage is shaped and typed
    like that placeholder. Left at the model's float32 initialisation, a
    middle stage of a float16 model would expect twice the bytes its
    neighbour sends, and the ring would hang or misread the next message.
    A tensor stored in none of the stage's files takes the stage's most common
    floating dtype.
    """
    floats = [v.dtype for v in used.values() if mx.issubdtype(v.dtype, mx.floating)]
    common = max(set(floats), key=floats.count) if floats else None
    changes = []
    for name, value in dict(tree_flatten(model.parameters())).items():
        if name in used or not mx.issubdtype(value.dtype, mx.floating):
            continue
        dtype = stored.get(name, common)
        if dtype is not None and dtype != value.dtype:
            changes.append((name, value.astype(dtype)))
    if changes:
        model.update(tree_unflatten(changes))


def _evaluate(params: dict[str, mx.array], progress: Callable[[float], None] | None) -> None:
    total = sum(p.nbytes for p in params.values()) or 1
    done = 0
    batch: list[mx.array] = []
    batch_bytes = 0
    for value in params.values():
        batch.append(value)
        batch_bytes += value.nbytes
        if batch_bytes >= 256 << 20:
            mx.eval(batch)
            done += batch_bytes
            batch, batch_bytes = [], 0
            if progress:
                progress(done / total)
    mx.eval(batch)
    if progress:
        progress(1.0)
