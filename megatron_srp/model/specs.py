"""Choose the transformer layer spec in one place.

Transformer Engine's spec (fused attention, norms, FP8) when TE is importable and a GPU is
present; otherwise Megatron-Core's local modules with torch SDPA as core attention and an
RMSNorm that supports sequence parallelism.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_srp.model.local_modules import RMSNorm, SDPAttention


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def choose_backend(requested: str, has_cuda: bool) -> str:
    """'auto' -> 'te' when TE and a GPU are present, else 'local'."""
    if requested == "auto":
        return "te" if (has_cuda and te_available()) else "local"
    return requested


def block_spec(backend: str, config: TransformerConfig, vp_stage: Optional[int]):
    """The spec GPTModel builds this rank's stage of the decoder from."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec)
        return get_gpt_layer_with_transformer_engine_spec()
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=RMSNorm)
