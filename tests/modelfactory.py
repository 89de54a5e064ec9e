"""Tiny models of real architectures with random weights, in mlx-lm layout.

Each model is a folder with config.json, safetensors shards split by layer with
a model.safetensors.index.json, and a byte-level BPE tokenizer trained here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

VOCAB_SIZE = 384

_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB_SIZE,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": True},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 10000.0,
    },
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False},
}

CORPUS = (
    "The lab has four machines. Each machine holds some layers of the model. "
    "Tokens flow from one machine to the next over the network, and the last "
    "machine picks the next word. A cluster of small computers can run a big "
    "model when they work together. The quick brown fox jumps over the lazy dog. "
)


def build_tokenizer(folder: Path) -> None:
    """Train a byte-level BPE tokenizer of VOCAB_SIZE tokens into folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 256,
                "chat_template": (
                    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
                ),
            }
        )
    )


def make_model(
    folder: Path,
    arch: str = "llama",
    *,
    num_layers: int = 4,
    shards: int = 2,
    seed: int = 0,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    bits: int = 0,
    group_size: int = 32,
) -> Path:
    """Write a tiny random model of ``arch`` into folder and return it.

    With ``bits``, the model is quantized as ``mlx_lm.convert -q`` would write
    it: every layer whose input width is a multiple of ``group_size``, with a
    ``quantization`` entry in config.json. The weights stay lazy until each
    shard is written, so a large shape needs memory for one shard at a time in
    full precision (plus the quantized whole).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {**_BASE, **ARCHITECTURES[arch], "num_hidden_layers": num_layers}
    config.update(overrides or {})
    config["torch_dtype"] = dtype
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    if bits:
        nn.quantize(
            model,
            group_size,
            bits,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
            ),
        )
        config["quantization"] = {"group_size": group_size, "bits": bits}
    weights = {
        k: v if v.dtype == mx.uint32 else v.astype(getattr(mx, dtype))
        for k, v in tree_flatten(model.parameters())
    }
    _write_shards(folder, weights, num_layers, shards)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(folder)
    return folder


def _write_shards(folder: Path, weights: dict[str, mx.array], num_layers: int, shards: int) -> None:
    from pomona.safetensors_layout import layer_index

    groups: list[dict[str, mx.array]] = [{} for _ in range(shards)]
    for name, value in weights.items():
        idx = layer_index(name)
        if idx is not None:
            shard = idx * shards // num_layers
        elif "embed" in name:
            shard = 0
        else:
            shard = shards - 1
        groups[shard][name] = value
    wmap = {}
    total = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(folder / fname), group, metadata={"format": "mlx"})
        for name, value in group.items():
            wmap[name] = fname
            total += value.nbytes
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2)
    )
