"""Measured speed (bandwidth and matmul TFLOPS), for chips the planner's table does not
know: measured once, remembered, and carried to the planner's predictions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from pomona.coordinator.memory_fit import resolve_node
from pomona.coordinator.placement import node_spec
from pomona.coordinator.planner import MEMORY_EFFICIENCY, _Prefill, predict
from pomona.model_profile import LayerProfile, ModelProfile
from pomona.v1 import worker_pb2
from pomona.worker import bandwidth
from pomona.worker.bandwidth import Speed

GIB = 2**30


def fail() -> Speed:
    raise AssertionError("measured twice")


def test_measurement_is_positive_and_remembered_per_machine(tmp_path: Path) -> None:
    first = bandwidth.cached_speed(tmp_path, "machine-a")
    assert first.bandwidth_gbs > 0 and first.tflops > 0
    assert bandwidth.cached_speed(tmp_path, "machine-a", measure=fail) == first
    other = bandwidth.cached_speed(tmp_path, "machine-b", measure=lambda: Speed(7.0, 0.5))
    assert other == Speed(7.0, 0.5)


def test_a_file_without_tflops_is_measured_again_then_remembered(tmp_path: Path) -> None:
    (tmp_path / "bandwidth.json").write_text(json.dumps({"fingerprint": "m", "gbs": 3.0}))
    speed = bandwidth.cached_speed(tmp_path, "m", measure=lambda: Speed(5.0, 0.25))
    assert speed == Speed(5.0, 0.25)
    assert json.loads((tmp_path / "bandwidth.json").read_text())["tflops"] == 0.25
    assert bandwidth.cached_speed(tmp_path, "m", measure=fail) == speed


def test_a_worker_pinned_to_other_cores_measures_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bandwidth, "device_key", lambda: {"device": "cpu", "cpus": 2})
    bandwidth.cached_speed(tmp_path, "m", measure=lambda: Speed(5.0, 0.25))
    monkeypatch.setattr(bandwidth, "device_key", lambda: {"device": "cpu", "cpus": 1})
    assert bandwidth.cached_speed(tmp_path, "m", measure=lambda: Speed(3.0, 0.125)).tflops == 0.125


def test_matmuls_run_in_the_devices_model_precision() -> None:
    assert bandwidth.matmul_dtype() == (
        mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    )
    assert bandwidth.measure_tflops(repeats=1) > 0


def test_the_planner_gets_the_measured_figures_only_when_there_are_some() -> None:
    hw = worker_pb2.Hardware(total_memory_bytes=64 << 30, chip="Some CPU")
    spec = node_spec("n", "n", hw)
    assert spec.bandwidth_gbs is None and spec.measured_tflops is None
    assert not spec.bandwidth_measured
    hw.measured_bandwidth_gbs, hw.measured_tflops = 12.5, 0.75
    spec = node_spec("n", "n", hw)
    assert (spec.bandwidth_gbs, spec.bandwidth_measured, spec.measured_tflops) == (12.5, True, 0.75)


def small_profile() -> ModelProfile:
    layer = LayerProfile(GIB // 8, GIB // 32, 0, 0, 1024, None)
    return ModelProfile(
        name="small",
        model_type="llama",
        layers=(layer,) * 4,
        embedding_bytes=GIB // 16,
        head_bytes=GIB // 16,
        tied_embeddings=False,
        other_params=GIB // 16,
        dtype="float32",
        quantization=None,
        hidden_size=1024,
        vocab_size=32000,
        max_context=4096,
        activation_bytes_per_token=1024,
    )


def one_stage(**hardware: Any) -> list[tuple[Any, int, int]]:
    hw = worker_pb2.Hardware(total_memory_bytes=64 << 30, chip="AMD EPYC", **hardware)
    return [(node_spec("n", "n", hw), 0, 4)]


def test_measured_tflops_set_the_ttft_and_no_gpu_cores_are_assumed() -> None:
    p, prompt = small_profile(), 1024
    guessed = one_stage(measured_bandwidth_gbs=10.0)
    measured = one_stage(measured_bandwidth_gbs=10.0, measured_tflops=0.005)
    assert resolve_node(guessed[0][0]).cores_assumption  # 7 Apple GPU cores, said so
    node = resolve_node(measured[0][0])
    assert node.flops == 0.005e12 and node.cores_assumption == "" and node.flops_measured
    before = predict(p, guessed, context_length=prompt, prompt_tokens=prompt)
    after = predict(p, measured, context_length=prompt, prompt_tokens=prompt)
    # One stage, compute-bound: every FLOP of the prompt at the measured rate, nothing else.
    assert after.ttft_s == pytest.approx(_Prefill.of(p, prompt).flops[-1] / 0.005e12)
    assert after.ttft_s > 50 * before.ttft_s


def test_decode_reads_at_the_measured_bandwidth_not_a_share_of_it() -> None:
    p = small_profile()
    measured = one_stage(measured_bandwidth_gbs=10.0, measured_tflops=0.005)
    published = [(replace(measured[0][0], bandwidth_measured=False), 0, 4)]  # a datasheet's
    a = predict(p, measured, context_length=16, prompt_tokens=1)
    b = predict(p, published, context_length=16, prompt_tokens=1)
    assert a.decode_tokens_per_s == pytest.approx(b.decode_tokens_per_s / MEMORY_EFFICIENCY)
