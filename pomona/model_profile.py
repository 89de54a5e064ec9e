"""What a model costs in memory, layer by layer, computed without loading any weight.

Two sources give the same profile: a `config.json` alone (mlx-lm's model class is
instantiated lazily, so its arrays only have shapes, and `nn.quantize` applies the
config's quantization entry), or a model folder's safetensors *headers* (the JSON at
the start of each file; tensors are never read).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.switch_mlp\.|\.experts\.")
_QUANT_AUX = (".scales", ".biases", ".global_scale", ".weight_scale_inv")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Quantization:
    """mlx-lm weight quantization: `bits` per weight, one scale (+ bias) per group."""

    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def bits_per_weight(self) -> float:
        # affine: a 16-bit scale and a 16-bit bias per group of weights
        return self.bits + 32 / self.group_size


@dataclass(frozen=True)
class LayerProfile:
    """One decoder layer. `expert_*` counts the routed experts, of which only
    `experts_per_token` of `num_experts` are read for each token."""

    weight_bytes: int
    params: int
    expert_bytes: int
    expert_params: int
    kv_bytes_per_token: int
    kv_window: int | None  # sliding-window layers keep at most this many tokens


@dataclass(frozen=True)
class ModelProfile:
    name: str
    model_type: str
    layers: tuple[LayerProfile, ...]
    embedding_bytes: int
    head_bytes: int  # final norm + lm_head (just the norm when embeddings are tied)
    tied_embeddings: bool
    other_params: int  # embedding + norm + lm_head
    dtype: str
    quantization: Quantization | None
    hidden_size: int
    vocab_size: int
    max_context: int | None
    num_experts: int = 0
    experts_per_token: int = 0
    activation_bytes_per_token: int = 0  # transient per prefill token inside one layer
    # Tensor parallelism: whether mlx-lm's model has shard(), and the sizes it
    # divides by the number of ranks (attention heads, KV heads, MLP width).
    tensor_shardable: bool = False
    tensor_widths: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_weight_bytes(self) -> tuple[int, ...]:
        return tuple(layer.weight_bytes for layer in self.layers)

    @property
    def kv_bytes_per_token_per_layer(self) -> tuple[int, ...]:
        return tuple(layer.kv_bytes_per_token for layer in self.layers)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_weight_bytes) + self.embedding_bytes + self.head_bytes

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers) + self.other_params

    @property
    def active_params(self) -> int:
        """Parameters used per token (MoE: the routed top-k share of the experts)."""
        active = sum(self.layer_active_params(i) for i in range(self.num_layers))
        return round(active) + self.other_params

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES.get(self.dtype, 2)

    @property
    def precision(self) -> str:
        q = self.quantization
        return self.dtype if q is None else f"{q.bits}-bit (group {q.group_size})"

    def expert_fraction(self, tokens: int = 1) -> float:
        """Share of the routed experts that `tokens` tokens touch, on average."""
        if not self.num_experts:
            return 1.0
        picked = min(self.experts_per_token / self.num_experts, 1.0)
        return 1.0 - (1.0 - picked) ** max(tokens, 1)

    def layer_active_bytes(self, index: int, tokens: int = 1) -> float:
        layer = self.layers[index]
        return layer.weight_bytes - layer.expert_bytes * (1.0 - self.expert_fraction(tokens))

    def layer_active_params(self, index: int) -> float:
        layer = self.layers[index]
        return layer.params - layer.expert_params * (1.0 - self.expert_fraction(1))

    def layer_kv_bytes(self, index: int, context: int, sequences: int = 1) -> int:
        """KV cache of one layer; mlx-lm grows caches in steps of 256 tokens."""
        layer = self.layers[index]
        tokens = math.ceil(context / 256) * 256
        if layer.kv_window is not None:
            tokens = min(tokens, layer.kv_window)
        return layer.kv_bytes_per_token * tokens * sequences

    def estimate_quantized(self, bits: int, group_size: int = 64) -> ModelProfile:
        """An estimate of this model quantized to `bits` (norms counted as quantized too)."""
        now = self.quantization.bits_per_weight if self.quantization else 8 * self.dtype_bytes
        target = Quantization(bits, group_size)
        ratio = target.bits_per_weight / now

        def scale(n: int) -> int:
            return round(n * ratio)

        layers = tuple(
            replace(
                layer,
                weight_bytes=scale(layer.weight_bytes),
                expert_bytes=scale(layer.expert_bytes),
            )
            for layer in self.layers
        )
        return replace(
            self,
            layers=layers,
            embedding_bytes=scale(self.embedding_bytes),
            head_bytes=scale(self.head_bytes),
            quantization=target,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        """The profile a worker measured (``to_json``), as the coordinator receives it."""
        data = json.loads(text)
        data["layers"] = tuple(LayerProfile(**layer) for layer in data["layers"])
        if data.get("quantization"):
            data["quantization"] = Quantization(**data["quantization"])
        data["tensor_widths"] = tuple(data.get("tensor_widths", ()))
        return cls(**data)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str | None = None) -> ModelProfile:
        """Profile from a config.json (and its `quantization` entry), with no weights."""
        import mlx.nn as nn  # heavy imports stay out of the CLI's start-up path
        from mlx.utils import tree_flatten

        def arrays() -> list[tuple[str, Any]]:
            return cast("list[tuple[str, Any]]", tree_flatten(model.parameters()))

        cfg = dict(config)
        model = _instantiate(cfg)
        params = {k: v.size for k, v in arrays()}
        quant = _quantization(cfg)
        if quant is not None:
            nn.quantize(
                model,
                group_size=quant.group_size,
                bits=quant.bits,
                mode=quant.mode,
                class_predicate=_quant_predicate(model, cfg, quant.group_size),
            )
        dtype_bytes = _DTYPE_BYTES.get(_dtype(cfg), 2)
        nbytes: dict[str, int] = {}
        for key, array in arrays():
            floating = "float" in str(array.dtype)
            nbytes[key] = array.size * dtype_bytes if floating else array.nbytes
        # scales and biases of quantized layers are storage, not parameters
        tensors = [(key, params.get(key, 0), size) for key, size in nbytes.items()]
        return _build(name or cfg.get("_name_or_path") or cfg["model_type"], cfg, tensors, model)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelProfile:
        """Profile from a model folder: config.json plus safetensors headers only."""
        folder = Path(path)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{folder} has no config.json: pass an mlx-lm model folder")
        try:
            cfg = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {config_path} as JSON: {e}") from e
        files = sorted(folder.glob("model*.safetensors"))  # what mlx-lm loads
        if not files:
            raise ValueError(
                f"{folder} has no model*.safetensors files: pass {config_path} to plan from "
                "the configuration alone"
            )
        quant = _quantization(cfg)
        overrides = cfg.get("quantization") or {}
        tensors = []
        for file in files:
            for key, (dtype, shape, size) in read_safetensors_header(file).items():
                count = math.prod(shape)
                if key.endswith(_QUANT_AUX):
                    count = 0
                elif quant is not None and dtype == "U32" and key.endswith(".weight"):
                    bits = quant.bits
                    override = overrides.get(key.removesuffix(".weight"))
                    if isinstance(override, dict):
                        bits = int(override.get("bits", bits))
                    count = count * 32 // bits
                tensors.append((key, count, size))
        try:
            model = _instantiate(cfg)
        except ValueError:
            model = None  # not an mlx-lm architecture: sliding windows come from the config
        return _build(folder.name, cfg, tensors, model)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) from a safetensors file's header, reading no tensor."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} has an unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a safetensors header that is not a JSON object")
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            out[key] = (str(info["dtype"]), [int(d) for d in info["shape"]], int(end - start))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {key!r} has a malformed header entry") from e
    return out


def _instantiate(cfg: dict[str, Any]) -> Any:
    """mlx-lm's model for `cfg`; its arrays are never evaluated, so this costs no memory."""
    from mlx_lm.utils import _get_classes

    if "model_type" not in cfg:
        raise ValueError("the config has no 'model_type': pass an mlx-lm / Hugging Face config")
    try:
        model_class, args_class = _get_classes(cfg)
        return model_class(args_class.from_dict(cfg))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"mlx-lm cannot build model type {cfg['model_type']!r} ({e}): pass a model "
            "folder with safetensors to plan from its headers"
        ) from e


def _dtype(cfg: Mapping[str, Any]) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")


def _quantization(cfg: Mapping[str, Any]) -> Quantization | None:
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if not isinstance(q, Mapping) or "bits" not in q or "group_size" not in q:
        return None  # no quantization, or one mlx-lm turns back into floats when loading
    return Quantization(int(q["bits"]), int(q["group_size"]), str(q.get("mode", "affine")))


def _quant_predicate(model: Any, cfg: Mapping[str, Any], group_size: int) -> Any:
    """What `mlx_lm.convert` quantizes: per-path overrides, the model's own predicate,
    else every layer that can be quantized with whole groups."""
    overrides = cfg.get("quantization") or cfg.get("quantization_config") or {}
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: Any) -> bool | dict[str, Any]:
        if path in overrides:
            return overrides[path]
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return own(path, module) if own is not None else True

    return predicate


def _kv_windows(cfg: Mapping[str, Any], model: Any, num_layers: int) -> list[int | None]:
    if model is not None and hasattr(model, "make_cache"):
        caches = model.make_cache()
        if len(caches) == num_layers:
            return [getattr(c, "max_size", None) for c in caches]
    window = cfg.get("sliding_window")
    if window and isinstance(cfg.get("layer_types"), list):
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    pattern = cfg.get("sliding_window_pattern")
    if window and isinstance(pattern, int) and pattern > 0:
        return [None if (i + 1) % pattern == 0 else window for i in range(num_layers)]
    return [None] * num_layers


def _kv_bytes_per_token(cfg: Mapping[str, Any], dtype_bytes: int) -> int:
    if cfg.get("kv_lora_rank"):  # MLA keeps the compressed latent and the rope key
        return (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 0))) * dtype_bytes
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return 2 * kv_heads * head_dim * dtype_bytes


def _activation_width(cfg: Mapping[str, Any]) -> int:
    """Floats alive per token inside one layer during prefill: residual stream and
    normed copies, the widest of the MLP (gate, up, product) and the attention q/k/v."""
    hidden = int(cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads", 1))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if cfg.get("kv_lora_rank"):
        head_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
    experts = int(cfg.get("num_experts_per_tok") or 0) + int(cfg.get("n_shared_experts") or 0)
    mlp = max(
        int(cfg.get("intermediate_size") or 0), int(cfg.get("moe_intermediate_size") or 0) * experts
    )
    return 4 * hidden + max(3 * mlp, 3 * heads * head_dim)


def _build(
    name: str, config: dict[str, Any], tensors: Iterable[tuple[str, int, int]], model: Any
) -> ModelProfile:
    # multimodal configs keep the decoder's fields under text_config
    cfg = {**config, **(config.get("text_config") or {})}
    try:
        return _assemble(name, cfg, tensors, model)
    except KeyError as e:
        raise ValueError(
            f"{name}: the config has no {e.args[0]!r}: pass a decoder model's config.json"
        ) from e


def _assemble(
    name: str, cfg: dict[str, Any], tensors: Iterable[tuple[str, int, int]], model: Any
) -> ModelProfile:
    per_layer: dict[int, list[int]] = {}  # index -> [bytes, params, expert bytes, params]
    embedding_bytes = head_bytes = other_params = 0
    for key, count, size in tensors:
        match = _LAYER.search(key)
        if match is None:
            other_params += count
            if "embed" in key or ".wte." in key:
                embedding_bytes += size
            else:
                head_bytes += size
            continue
        acc = per_layer.setdefault(int(match.group(1)), [0, 0, 0, 0])
        expert = _EXPERT.search(key) is not None
        acc[0] += size
        acc[1] += count
        acc[2] += size if expert else 0
        acc[3] += count if expert else 0
    declared = int(cfg.get("num_hidden_layers") or len(per_layer))
    num_layers = min(declared, len(per_layer))  # drops extra MTP layers of raw checkpoints
    if num_layers == 0 or sorted(per_layer)[:num_layers] != list(range(num_layers)):
        raise ValueError(
            f"{name}: no tensors named 'layers.<i>.' for layers 0..{declared - 1}; "
            "pass an mlx-lm model folder or config"
        )
    dtype = _dtype(cfg)
    kv = _kv_bytes_per_token(cfg, _DTYPE_BYTES.get(dtype, 2))
    windows = _kv_windows(cfg, model, num_layers)
    layers = tuple(
        LayerProfile(
            weight_bytes=per_layer[i][0],
            params=per_layer[i][1],
            expert_bytes=per_layer[i][2],
            expert_params=per_layer[i][3],
            kv_bytes_per_token=kv,
            kv_window=windows[i],
        )
        for i in range(num_layers)
    )
    num_experts = int(
        cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    )
    max_context = cfg.get("max_position_embeddings") or cfg.get("max_seq_len")
    return ModelProfile(
        name=str(name),
        model_type=str(cfg["model_type"]),
        layers=layers,
        embedding_bytes=embedding_bytes,
        head_bytes=head_bytes,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        other_params=other_params,
        dtype=dtype,
        quantization=_quantization(cfg),
        hidden_size=int(cfg["hidden_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_context=int(max_context) if max_context else None,
        num_experts=num_experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
        activation_bytes_per_token=_activation_width(cfg) * _DTYPE_BYTES.get(dtype, 2),
        tensor_shardable=hasattr(model, "shard"),
        tensor_widths=tuple(
            int(cfg[k])
            for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
            if cfg.get(k)
        ),
    )
