"""The two modules the local (non-Transformer-Engine) layer spec needs from us.

* ``SDPAttention``: Megatron-Core's local ``DotProductAttention`` needs a CUDA buffer; this has
  the same constructor and forward signature and uses torch's ``scaled_dot_product_attention``
  (flash / memory-efficient kernels on GPU, the math kernel on CPU).
* ``RMSNorm``: Megatron's torch-norm fallback refuses sequence parallelism because it cannot
  mark its weight for the tensor-parallel gradient all-reduce; this one marks it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal (or masked) attention over [s, b, heads, head_dim] tensors, GQA-aware."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def _mask(self, q_len: int, k_len: int, attention_mask: Optional[torch.Tensor],
              device: torch.device) -> tuple[bool, Optional[torch.Tensor]]:
        """``(is_causal, allowed)`` for SDPA.

        The queries are the *last* ``q_len`` of ``k_len`` positions: all of them in training,
        one new token or an appended chunk behind a KV cache. A causal layer stays causal in
        every case, which is why the layer's own mask type decides and not the ``no_mask``
        Megatron's inference path passes once a cache holds tokens. ``attention_mask`` (True =
        blocked, Megatron's convention) marks padding; a query may always see itself, so a
        padding position that may see nothing else stays finite instead of becoming NaN.
        """
        causal = self.attn_mask_type == AttnMaskType.causal
        if attention_mask is None:
            if not causal or q_len == 1:
                return False, None
            if q_len == k_len:
                return True, None
        elif not causal:
            return False, ~attention_mask
        rows = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
        cols = torch.arange(k_len, device=device).unsqueeze(0)
        below = cols <= rows
        if attention_mask is None:
            return False, below
        return False, (~attention_mask & below) | (cols == rows)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        groups = q.size(1) // k.size(1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        causal, mask = self._mask(q.size(2), k.size(2), attention_mask, q.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        # [b, n, s, d] -> [s, b, n*d]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


class RMSNorm(torch.nn.Module):
    """RMSNorm whose weight Megatron all-reduces over TP when sequence parallelism is on."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
