"""Choose the transformer layer spec in one place.

Transformer Engine's spec (fused attention, norms, FP8) when TE is importable and a GPU is
present; otherwise Megatron-Core's local modules with torch SDPA as core attention.
"""
from __future__ import annotations

import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_srp.model.sdpa_attention import SDPAttention


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def choose_backend(requested: str, has_cuda: bool) -> str:
    """'auto' -> 'te' when TE and a GPU are present, else 'local'."""
    if requested == "auto":
        return "te" if (has_cuda and te_available()) else "local"
    return requested


def layer_spec(backend: str) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec)
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
