"""The Megatron-Core model really has the Llama / SmolLM2 shape the presets describe."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: it sets up Megatron's global parallel state and the CPU path.
_PROBE = r"""
import json, sys
from megatron_srp.config import load_config
from megatron_srp.training import parallel
from megatron_srp.model.provider import build_model_chunks
from megatron_srp.model.local_modules import RMSNorm, SDPAttention
cfg = load_config(None, sys.argv[1:])
parallel.initialize(cfg)
model = build_model_chunks(cfg, 8192, "fp32", False)[0]
names = [n for n, _ in model.named_parameters()]
print(json.dumps({
    "params": sum(p.numel() for p in model.parameters()),
    "biases": [n for n in names if n.endswith("bias")],
    "sdpa": sum(isinstance(m, SDPAttention) for m in model.modules()),
    "rmsnorm": sum(isinstance(m, RMSNorm) for m in model.modules()),
    "output_weight_separate": any(n.startswith("output_layer") for n in names),
}))
parallel.destroy()
"""


def _probe(*overrides: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, *overrides], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tiny_model_matches_its_preset():
    from megatron_srp.presets import get_preset
    shape = get_preset("tiny")
    got = _probe("model.preset=tiny")
    assert got["params"] == shape.num_parameters(8192)
    assert got["biases"] == []
    assert got["sdpa"] == shape.num_layers
    assert got["rmsnorm"] == 2 * shape.num_layers + 1
    assert got["output_weight_separate"] is False  # tied embeddings


def test_untied_embeddings_add_an_output_matrix():
    from megatron_srp.presets import resolve_shape
    shape = resolve_shape("tiny", tie_embeddings=False)
    got = _probe("model.preset=tiny", "model.tie_embeddings=false")
    assert got["params"] == shape.num_parameters(8192)
    assert got["output_weight_separate"] is True


def test_sdp_attention_equals_explicit_grouped_query_attention():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_srp.model.local_modules import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, use_cpu_initialization=True)
    attn = SDPAttention(config, 1, AttnMaskType.causal, "self").eval()
    gen = torch.Generator().manual_seed(0)
    s, b, n, g, d = 7, 2, 4, 2, 8
    q = torch.randn(s, b, n, d, generator=gen)
    k = torch.randn(s, b, g, d, generator=gen)
    v = torch.randn(s, b, g, d, generator=gen)
    out = attn(q, k, v, attention_mask=None)

    k_full = k.repeat_interleave(n // g, dim=2)
    v_full = v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k_full) / d ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    ref = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v_full).reshape(s, b, n * d)
    assert out.shape == (s, b, n * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
