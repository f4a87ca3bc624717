"""Model presets: parameter counts against published sizes, overrides, unknown names."""
from __future__ import annotations

import pytest

from megatron_srp.presets import PRESETS, ModelShape, get_preset, resolve_shape

# Published sizes: SmolLM2 model cards / HF configs (tied embeddings, vocab 49152);
# Llama 2 7B (untied, vocab 32000); Llama 3 70B (untied, vocab 128256).
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "llama-7b": 6_738_415_616,
    "llama-70b": 70_553_706_496,
}
EXPECTED_VOCAB = {"smollm2-135m": 49152, "smollm2-360m": 49152, "smollm2-1.7b": 49152,
                  "llama-7b": 32000, "llama-70b": 128256}
EXPECTED_TIED = {"smollm2-135m": True, "smollm2-360m": True, "smollm2-1.7b": True,
                 "llama-7b": False, "llama-70b": False}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published_size(name):
    shape = get_preset(name)
    assert shape.vocab_size == EXPECTED_VOCAB[name]
    assert shape.tie_embeddings is EXPECTED_TIED[name]
    count = shape.num_parameters()
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, count)


def test_smollm2_135m_count_is_exact():
    assert get_preset("smollm2-135m").num_parameters() == 134_515_008


def test_num_parameters_vocab_argument_and_tying():
    shape = get_preset("smollm2-135m")
    h = shape.hidden_size
    assert shape.num_parameters(vocab_size=8192) == shape.num_parameters() - (49152 - 8192) * h
    untied = resolve_shape("smollm2-135m", tie_embeddings=False)
    assert untied.num_parameters() == shape.num_parameters() + 49152 * h


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_self_consistent(name):
    s = PRESETS[name]
    assert s.hidden_size % s.num_attention_heads == 0
    assert s.num_attention_heads % s.num_query_groups == 0
    assert s.kv_channels * s.num_attention_heads == s.hidden_size


def test_resolve_shape_applies_overrides_and_ignores_none():
    base = get_preset("smollm2-360m")
    shape = resolve_shape("smollm2-360m", num_layers=2, hidden_size=None, rotary_base=5e5,
                          tie_embeddings=False)
    assert isinstance(shape, ModelShape)
    assert shape.num_layers == 2
    assert shape.hidden_size == base.hidden_size  # None means "keep the preset's"
    assert shape.rotary_base == 5e5
    assert shape.tie_embeddings is False
    assert shape.ffn_hidden_size == base.ffn_hidden_size
    assert PRESETS["smollm2-360m"] == base  # the preset itself is not modified


def test_resolve_shape_without_overrides_is_the_preset():
    assert resolve_shape("tiny") == PRESETS["tiny"]


def test_resolve_shape_rejects_unknown_field():
    with pytest.raises(TypeError):
        resolve_shape("tiny", num_experts=8)


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError) as exc:
        get_preset("gpt5")
    msg = str(exc.value)
    assert "gpt5" in msg
    for name in PRESETS:
        assert name in msg
    with pytest.raises(KeyError, match="known: tiny"):
        resolve_shape("gpt5", num_layers=2)
