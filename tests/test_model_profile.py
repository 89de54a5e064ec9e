"""Model profiles: exact bytes per layer from a config alone or from safetensors headers."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model

from pomona.model_profile import ModelProfile, read_safetensors_header

CONFIGS = Path(__file__).parents[1] / "pomona" / "model_configs"
needs_configs = pytest.mark.skipif(
    not CONFIGS.is_dir(), reason=f"real model configs not found at {CONFIGS}"
)

# Parameter counts as published (pomona/model_configs/README.md).
PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8.0e9,
    "llama-3.1-70b": 70.6e9,
    "llama-3.1-405b": 405.9e9,
    "qwen2.5-72b": 72.7e9,
    "qwen3-235b-a22b": 235e9,
    "mixtral-8x7b": 46.7e9,
    "deepseek-v3": 671e9,
}
PUBLISHED_ACTIVE = {"qwen3-235b-a22b": 22e9, "mixtral-8x7b": 12.9e9, "deepseek-v3": 37e9}

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "rms_norm_eps": 1e-5,
    "vocab_size": 256,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}
TINY_MODELS = {
    "llama": {**TINY, "model_type": "llama", "tie_word_embeddings": False},
    "qwen2-tied": {**TINY, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3_moe": {
        **TINY,
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
}


@cache
def real_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@cache
def real_profile(name: str, bits: int | None = None) -> ModelProfile:
    config = dict(real_config(name))
    if bits is not None:
        config["quantization"] = {"group_size": 64, "bits": bits}
    return ModelProfile.from_config(config, name=name)


def write_model(folder: Path, config: dict[str, Any], bits: int | None = None) -> dict[str, Any]:
    """A random-weight model as mlx_lm.convert writes it, in two safetensors shards."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.bfloat16)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    weights = dict(tree_flatten(model.parameters()))
    folder.mkdir(parents=True, exist_ok=True)
    first = {k: v for k, v in weights.items() if "layers.0." in k or "layers.1." in k}
    mx.save_safetensors(str(folder / "model-00001-of-00002.safetensors"), first)
    rest = {k: v for k, v in weights.items() if k not in first}
    mx.save_safetensors(str(folder / "model-00002-of-00002.safetensors"), rest)
    (folder / "config.json").write_text(json.dumps(config))
    return config


@needs_configs
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published_within_half_a_percent(name: str) -> None:
    profile = real_profile(name)
    assert profile.params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)
    assert profile.num_layers == real_config(name)["num_hidden_layers"]


@needs_configs
@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE))
def test_active_parameters_of_moe_models_match_published(name: str) -> None:
    assert real_profile(name).active_params == pytest.approx(PUBLISHED_ACTIVE[name], rel=0.02)


@needs_configs
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_four_bit_group_64_stores_four_and_a_half_bits_per_weight(name: str) -> None:
    quantized = real_profile(name, 4)
    assert quantized.params == real_profile(name).params
    assert 4.49 < quantized.weight_bytes * 8 / quantized.params < 4.56
    assert quantized.precision == "4-bit (group 64)"


@needs_configs
def test_bf16_weights_are_two_bytes_per_parameter() -> None:
    profile = real_profile("llama-3.1-70b")
    assert profile.weight_bytes == 2 * profile.params
    assert profile.embedding_bytes == profile.head_bytes - 2 * 8192  # head = lm_head + norm


@needs_configs
@pytest.mark.parametrize(
    ("name", "per_token_per_layer"),
    [
        ("llama-3.1-8b", 2 * 8 * 128 * 2),
        ("llama-3.1-70b", 2 * 8 * 128 * 2),
        ("qwen3-235b-a22b", 2 * 4 * 128 * 2),
        ("mixtral-8x7b", 2 * 8 * 128 * 2),
        ("deepseek-v3", (512 + 64) * 2),  # MLA: compressed latent + rope key
    ],
)
def test_kv_cache_bytes_per_token_follow_the_attention_type(
    name: str, per_token_per_layer: int
) -> None:
    profile = real_profile(name)
    assert set(profile.kv_bytes_per_token_per_layer) == {per_token_per_layer}
    assert all(layer.kv_window is None for layer in profile.layers)


@needs_configs
def test_deepseek_first_three_layers_are_dense_and_smaller() -> None:
    profile = real_profile("deepseek-v3")
    dense, moe = profile.layers[:3], profile.layers[3:]
    assert all(layer.expert_bytes == 0 for layer in dense)
    assert all(layer.expert_bytes > 0 for layer in moe)
    assert max(layer.weight_bytes for layer in dense) < min(layer.weight_bytes for layer in moe)
    assert len({layer.weight_bytes for layer in moe}) == 1


@needs_configs
def test_expert_share_grows_with_tokens_in_a_batch() -> None:
    profile = real_profile("mixtral-8x7b")
    assert profile.expert_fraction(1) == pytest.approx(2 / 8)
    assert profile.expert_fraction(4) > profile.expert_fraction(2) > profile.expert_fraction(1)
    assert profile.layer_active_bytes(0, 10_000) == pytest.approx(profile.layers[0].weight_bytes)


@needs_configs
def test_estimated_four_bit_variant_is_close_to_the_exact_one() -> None:
    estimate = real_profile("llama-3.1-70b").estimate_quantized(4)
    exact = real_profile("llama-3.1-70b", 4)
    assert estimate.weight_bytes == pytest.approx(exact.weight_bytes, rel=0.01)


def test_sliding_window_layers_cap_their_kv_cache() -> None:
    config = {
        **TINY_MODELS["llama"],
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 128,
    }
    profile = ModelProfile.from_config(config)
    assert [layer.kv_window for layer in profile.layers] == [128, None, 128, None]
    per_token = 2 * 2 * 16 * 2
    assert profile.layer_kv_bytes(0, 4096) == 128 * per_token
    assert profile.layer_kv_bytes(1, 4096) == 4096 * per_token
    assert profile.layer_kv_bytes(1, 300, sequences=2) == 512 * per_token * 2  # 256-token steps


def test_unknown_model_type_is_refused_with_advice() -> None:
    with pytest.raises(ValueError, match="model folder with safetensors"):
        ModelProfile.from_config({**TINY, "model_type": "no-such-architecture"})


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_safetensors_headers_agree_with_the_config(
    tmp_path: Path, arch: str, bits: int | None
) -> None:
    config = write_model(tmp_path / arch, dict(TINY_MODELS[arch]), bits)
    from_dir = ModelProfile.from_model_dir(tmp_path / arch)
    from_config = ModelProfile.from_config(config)
    assert replace(from_dir, name=from_config.name) == from_config
    assert from_dir.name == arch


def test_tied_embeddings_have_no_lm_head(tmp_path: Path) -> None:
    write_model(tmp_path / "tied", dict(TINY_MODELS["qwen2-tied"]))
    profile = ModelProfile.from_model_dir(tmp_path / "tied")
    assert profile.tied_embeddings
    assert profile.embedding_bytes == 256 * 64 * 2
    assert profile.head_bytes == 64 * 2  # the final norm only


def test_moe_expert_bytes_are_found_from_headers(tmp_path: Path) -> None:
    write_model(tmp_path / "moe", dict(TINY_MODELS["qwen3_moe"]))
    profile = ModelProfile.from_model_dir(tmp_path / "moe")
    assert all(layer.expert_bytes == 3 * 4 * 64 * 64 * 2 for layer in profile.layers)
    assert profile.num_experts == 4 and profile.experts_per_token == 2


def test_header_is_read_without_reading_tensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), {"model.layers.0.w.weight": mx.zeros((3, 5), mx.bfloat16)})
    with open(path, "r+b") as f:  # corrupt the tensor data: headers must not care
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    assert read_safetensors_header(path) == {"model.layers.0.w.weight": ("BF16", [3, 5], 30)}


def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="unreadable safetensors header"):
        read_safetensors_header(path)


def test_a_folder_without_weights_points_to_its_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_MODELS["llama"]))
    with pytest.raises(ValueError, match="config.json to plan from the configuration"):
        ModelProfile.from_model_dir(tmp_path)
