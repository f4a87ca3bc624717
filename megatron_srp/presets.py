"""Model shapes by name. A preset is data; the provider turns it into a Megatron GPTModel.

All presets are Llama-shaped (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases).
The SmolLM2 shapes follow the published HF configs; 7B and 70B follow Llama 2/3.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from typing import Optional


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # the preset's reference vocabulary; a run uses its tokenizer's size
    max_position_embeddings: int
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # Llama 3.x RoPE frequency scaling (low/high frequency factors 1 and 4, original context
    # 8192: what Megatron-Core implements); None: plain RoPE.
    rope_scaling_factor: Optional[float] = None

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, vocab_size: int | None = None) -> int:
        """Parameter count (embeddings counted once when tied)."""
        v = vocab_size or self.vocab_size
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = self.num_query_groups * self.kv_channels
        attn = h * h + 2 * h * kv + h * h
        mlp = 3 * h * f
        norms = 2 * h
        emb = v * h * (1 if self.tie_embeddings else 2)
        return L * (attn + mlp + norms) + emb + h


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                       num_query_groups=2, vocab_size=8192, max_position_embeddings=1024),
    "smollm2-135m": ModelShape(num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                               num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                               max_position_embeddings=8192, rotary_base=100000.0),
    "smollm2-360m": ModelShape(num_layers=32, hidden_size=960, ffn_hidden_size=2560,
                               num_attention_heads=15, num_query_groups=5, vocab_size=49152,
                               max_position_embeddings=8192, rotary_base=100000.0),
    "smollm2-1.7b": ModelShape(num_layers=24, hidden_size=2048, ffn_hidden_size=8192,
                               num_attention_heads=32, num_query_groups=32, vocab_size=49152,
                               max_position_embeddings=8192, rotary_base=130000.0),
    "llama-7b": ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                           num_attention_heads=32, num_query_groups=32, vocab_size=32000,
                           max_position_embeddings=4096, tie_embeddings=False),
    "llama-70b": ModelShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                            num_attention_heads=64, num_query_groups=8, vocab_size=128256,
                            max_position_embeddings=8192, rotary_base=500000.0,
                            tie_embeddings=False),
}


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Round the vocabulary up so every TP shard is the same size (as Megatron-LM does)."""
    step = multiple * tensor_parallel
    return ((vocab_size + step - 1) // step) * step


# A shape given field by field (e.g. one derived from an imported Hugging Face config.json):
# no preset fills in what the config leaves out.
CUSTOM = "custom"


def get_preset(name: str) -> ModelShape:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}, {CUSTOM}")
    return PRESETS[name]


def resolve_shape(preset: str, **overrides) -> ModelShape:
    """The preset with any non-None overrides applied; for :data:`CUSTOM`, the overrides must
    name every field without a default (a ValueError lists the missing ones)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if preset == CUSTOM:
        required = [f.name for f in fields(ModelShape)
                    if f.default is MISSING and f.name not in given]
        if required:
            raise ValueError(f"model.preset={CUSTOM} needs "
                             + ", ".join(f"model.{name}" for name in required))
        return ModelShape(**given)
    return replace(get_preset(preset), **given)
