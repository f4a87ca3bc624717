"""The FLOPs / MFU arithmetic behind every throughput figure."""
from __future__ import annotations

import math

import pytest

from megatron_srp.presets import get_preset
from megatron_srp.training.metrics import (Throughput, forward_flops_per_token, peak_tflops,
                                           train_flops_per_token)


def _matrix_params(shape, vocab: int) -> int:
    """Weights that multiply every token once: all projections plus the output matrix."""
    h, f, L = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    kv = shape.num_query_groups * shape.kv_channels
    return L * (h * (h + 2 * kv) + h * h + 3 * h * f) + h * vocab


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "smollm2-1.7b", "llama-70b"])
def test_flops_without_attention_are_two_per_matrix_weight(preset):
    shape = get_preset(preset)
    assert forward_flops_per_token(shape, 0, shape.vocab_size) == 2 * _matrix_params(
        shape, shape.vocab_size)


def test_attention_term_grows_linearly_with_sequence():
    shape = get_preset("smollm2-1.7b")
    f = lambda s: forward_flops_per_token(shape, s, 49152)
    assert f(4096) - f(2048) == 4 * shape.num_layers * shape.hidden_size * 2048
    assert train_flops_per_token(shape, 2048, 49152) == 3 * f(2048)


def test_smollm2_1_7b_matches_the_6n_rule_of_thumb():
    shape = get_preset("smollm2-1.7b")
    n = shape.num_parameters()
    ratio = train_flops_per_token(shape, 2048, shape.vocab_size) / (6 * n)
    # 6N ignores attention scores (+~20% at s=2048) and counts tied embeddings once.
    assert 1.1 < ratio < 1.35, ratio


def test_peak_lookup_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert peak_tflops("cpu (2 cores)") is None
    shape = get_preset("tiny")
    tp = Throughput(shape, 256, 8192, world_size=2, device_name="NVIDIA H100 80GB HBM3")
    out = tp(tokens=1_000_000, seconds=2.0)
    assert out["tokens_per_s"] == pytest.approx(500_000)
    expected_tflops = 500_000 * train_flops_per_token(shape, 256, 8192) / 2 / 1e12
    assert out["tflops_per_device"] == pytest.approx(expected_tflops)
    assert out["mfu"] == pytest.approx(expected_tflops / 989.4)
    assert math.isnan(Throughput(shape, 256, 8192, 1, "cpu")(100, 1.0)["mfu"])
