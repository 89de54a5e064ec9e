"""`pomona plan`: the table, --json, nodes files and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from click.testing import CliRunner, Result
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from pomona.coordinator.nodes_file import NodesFileError, parse_nodes
from pomona.coordinator.plan_cli import plan_command

GIB = 2**30
# Llama 3.1 70B's architecture: planning needs no weights, so the test carries the config.
LLAMA_70B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
TINY: dict[str, Any] = {
    **LLAMA_70B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}
LAB = """
nodes:
  - {name: mbp, chip: "Apple M3 Max", memory_gb: 128}
  - {name: mini, chip: "Apple M4 Pro", memory_gb: 48, count: 2}
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(plan_command, list(args))


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(LAB)
    return path


@pytest.fixture
def llama_70b(tmp_path: Path) -> Path:
    path = tmp_path / "llama-70b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_70B))
    return path


def test_table_shows_every_stage_and_the_prediction(lab: Path, llama_70b: Path) -> None:
    result = run(str(llama_70b), "--nodes", str(lab), "--context", "4096")
    assert result.exit_code == 0, result.output
    for text in ("llama-70b", "mbp", "mini-1", "mini-2", "0-37 (38)", "M3 Max", "free after load"):
        assert text in result.output
    assert "tok/s per stream" in result.output and "TTFT" in result.output
    assert "backend: ring" in result.output and "formula: t_token" in result.output


def test_json_is_one_documented_object(lab: Path, llama_70b: Path) -> None:
    result = run(str(llama_70b), "--nodes", str(lab), "--json", "--context", "8192")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"]["name"] == "llama-70b" and data["model"]["num_layers"] == 80
    assert data["context_length"] == 8192 and data["backend"] == "ring"
    stages = data["stages"]
    assert stages[0]["start_layer"] == 0 and stages[-1]["end_layer"] == 80
    assert sum(s["num_layers"] for s in stages) == 80
    for key in ("weights_bytes", "kv_bytes", "free_after_load_bytes", "share_of_time"):
        assert all(key in s for s in stages)
    assert data["decode_tokens_per_s"] > 0 and data["ttft_s"] > 0 and data["formula"]


def test_bits_plans_a_quantized_variant_of_a_config(lab: Path, llama_70b: Path) -> None:
    result = run(str(llama_70b), "--nodes", str(lab), "--bits", "4", "--json")
    data = json.loads(result.output)
    assert data["model"]["precision"] == "4-bit (group 64)"
    assert [s["name"] for s in data["stages"]] == ["mbp"]


def test_throughput_objective_uses_every_node(lab: Path, llama_70b: Path) -> None:
    result = run(str(llama_70b), "--nodes", str(lab), "--bits", "4", "--objective", "throughput")
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("mbp", "mini-1", "mini-2"))


def test_a_model_folder_is_planned_from_its_safetensors_headers(tmp_path: Path, lab: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    model_class, args_class = _get_classes(TINY)
    model = model_class(args_class.from_dict(TINY))
    model.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(TINY))
    result = run(str(folder), "--nodes", str(lab), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"]["name"] == "tiny" and data["context_length"] == 512
    assert run(str(folder), "--nodes", str(lab), "--bits", "4").exit_code != 0


def test_a_bundled_config_is_found_by_name(lab: Path) -> None:
    result = run("qwen3-235b-a22b", "--nodes", str(lab), "--bits", "4")
    assert result.exit_code == 0, result.output
    assert "qwen3-235b-a22b-4bit" in result.output


def test_a_model_that_does_not_fit_exits_non_zero_with_one_line(
    tmp_path: Path, llama_70b: Path
) -> None:
    nodes = tmp_path / "small.json"
    nodes.write_text(json.dumps([{"name": "m4", "chip": "Apple M4", "memory_gb": 16}]))
    result = run(str(llama_70b), "--nodes", str(nodes))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: llama-70b (bfloat16) does not fit on 1 node")
    assert "short" in lines[0] and "would not fit either" in lines[0]


@pytest.mark.parametrize(
    ("nodes_text", "message"),
    [
        ('- {name: a, chip: "Apple M4 Pr0", memory_gb: 64}', "did you mean 'Apple M4 Pro'"),
        ("- {name: a, chip: Apple M4, memory_gb: -1}", "memory_gb must be a positive number"),
        ("- {name: a, chip: Apple M4}", "missing memory_gb"),
        ("- {name: a, chip: Apple M4, memory_gb: 16, ram: 3}", "unknown key ram"),
        ("- {name: a, chip: Apple M4, memory_gb: 16, gpu_cores: 12}", "8 or 10 GPU cores"),
        ("- [unclosed", "is not valid YAML"),
        ("nodes: 3", "expected a list of nodes"),
        (
            "- {name: a, chip: X, memory_gb: 16, bandwidth_gbs: 9, measured_bandwidth_gbs: 3}",
            "give the bandwidth once",
        ),
        ("- {name: a, chip: X, memory_gb: 16, measured_tflops: 1}", "give bandwidth_gbs"),
    ],
)
def test_a_bad_nodes_file_is_one_clear_line(
    tmp_path: Path, llama_70b: Path, nodes_text: str, message: str
) -> None:
    nodes = tmp_path / "bad.yaml"
    nodes.write_text(nodes_text)
    result = run(str(llama_70b), "--nodes", str(nodes))
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1
    assert message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--coordinator", "127.0.0.1:1"], "cannot reach 127.0.0.1:1"),
        ([], "pass --nodes FILE"),
    ],
)
def test_nodes_come_from_a_file_or_a_reachable_coordinator(
    llama_70b: Path, args: list[str], message: str
) -> None:
    result = run(str(llama_70b), *args)
    assert result.exit_code != 0 and message in result.output


def test_an_unknown_model_lists_what_is_known(lab: Path) -> None:
    result = run("no-such-model", "--nodes", str(lab))
    assert result.exit_code != 0
    assert "is not a model folder, a config.json, or a known config" in result.output


def test_nodes_file_expands_counts_and_reads_every_field() -> None:
    nodes = parse_nodes(
        {
            "nodes": [
                {"name": "studio", "chip": "M2 Ultra", "memory_gb": 192, "count": 2, "rdma": True},
                {
                    "name": "mbp",
                    "chip": "Apple M4 Max",
                    "memory_gb": 128,
                    "gpu_cores": 40,
                    "gpu_memory_gb": 112,
                    "memory_in_use_gb": 6,
                    "address": "10.0.0.9:7700",
                },
                {
                    "name": "lab-pc",
                    "chip": "Some Future Chip",
                    "memory_gb": 64,
                    "bandwidth_gbs": 500,
                },
            ]
        }
    )
    assert [n.node_id for n in nodes] == ["studio-1", "studio-2", "mbp", "lab-pc"]
    assert nodes[0].chip == "Apple M2 Ultra" and nodes[0].rdma
    assert nodes[0].total_memory_bytes == 192 * GIB
    mbp = nodes[2]
    assert mbp.gpu_memory_limit_bytes == 112 * GIB and mbp.memory_in_use_bytes == 6 * GIB
    assert mbp.gpu_cores == 40 and mbp.address == "10.0.0.9:7700"
    assert nodes[3].bandwidth_gbs == 500.0


def test_nodes_file_refuses_duplicate_names() -> None:
    with pytest.raises(NodesFileError, match="two nodes are named 'a'"):
        parse_nodes([{"name": "a", "chip": "M4", "memory_gb": 16}] * 2)


def test_context_defaults_to_the_coordinators_and_prompt_tokens_set_ttft(
    lab: Path, llama_70b: Path
) -> None:
    from pomona.cli import main

    coordinator = next(p for p in main.commands["coordinator"].params if p.name == "context")
    default = json.loads(run(str(llama_70b), "--nodes", str(lab), "--json").output)
    assert default["context_length"] == coordinator.default == 8192
    assert default["prompt_tokens"] == 512
    asked = json.loads(
        run(str(llama_70b), "--nodes", str(lab), "--json", "--prompt-tokens", "4096").output
    )
    assert asked["prompt_tokens"] == 4096 and asked["ttft_s"] > default["ttft_s"]
    too_long = run(
        str(llama_70b), "--nodes", str(lab), "--context", "1024", "--prompt-tokens", "2048"
    )
    assert too_long.exit_code == 1 and "does not fit a context" in too_long.output


def test_a_nodes_file_takes_what_a_worker_measured(tmp_path: Path, llama_70b: Path) -> None:
    entry = {"name": "pc", "chip": "AMD EPYC", "memory_gb": 256, "measured_bandwidth_gbs": 40}
    (node,) = parse_nodes([{**entry, "measured_tflops": 2.5}])
    assert (node.bandwidth_gbs, node.bandwidth_measured, node.measured_tflops) == (40, True, 2.5)
    path = tmp_path / "pc.json"
    ttft = {}
    for tflops in (None, 2.5):
        path.write_text(json.dumps([{**entry, "measured_tflops": tflops}]))
        result = run(str(llama_70b), "--nodes", str(path), "--json")
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert any("GPU cores" in n for n in out["notes"]) == (tflops is None)
        ttft[tflops] = out["ttft_s"]
    assert ttft[2.5] == pytest.approx(ttft[None] * 7 * 0.35 * 0.85 / 2.5, rel=0.05)
