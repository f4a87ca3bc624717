"""A KV cache for a batch of left-padded sequences, on Megatron-Core's static inference context.

Megatron's ``StaticInferenceContext`` keeps each layer's keys and values and the number of
positions already processed (``sequence_len_offset``, one for the whole batch). Every row
therefore advances one position per step, so prompts of different lengths are **left-padded**
to a common length and the padding is masked out of attention (``SDPAttention`` in the local
layer spec does the masking; Megatron passes our mask through to it). Rotary position
embeddings only see differences of positions, so a left-padded row computes what it would alone.

    cache = KVCache(model, vocab_size, max_length=256)
    logits = cache.prefill(tokens, padding)        # [b, v]: next-token logits per row
    logits = cache.extend(next_tokens[:, None])    # one position more for every row
    cache.select(rows)                             # beam search / dropping finished rows
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_srp import compat


class CacheFullError(ValueError):
    """More positions than the cache was sized for (the model's context length)."""


class KVCache:
    """The attention keys/values of every position fed so far, for every row of a batch."""

    def __init__(self, model, vocab_size: int, max_length: Optional[int] = None) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.max_length = int(max_length or model.max_sequence_length)
        self.context: Optional[StaticInferenceContext] = None
        self.padding: Optional[torch.Tensor] = None  # [b, max_length] True = padding position

    @property
    def length(self) -> int:
        """Positions already in the cache (the same for every row)."""
        return 0 if self.context is None else int(self.context.sequence_len_offset)

    @property
    def batch_size(self) -> int:
        return 0 if self.padding is None else int(self.padding.size(0))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, padding: Optional[torch.Tensor] = None,
                all_logits: bool = False) -> torch.Tensor:
        """Start a new batch from ``tokens`` [b, s] (``padding`` [b, s], True where a row is
        left padding). Returns the next-token logits [b, v] (or [b, s, v] with ``all_logits``)."""
        b, s = tokens.shape
        self.context = StaticInferenceContext(b, self.max_length)
        self.padding = torch.zeros(b, self.max_length, dtype=torch.bool, device=tokens.device)
        if padding is not None:
            self.padding[:, :s] = padding
        return self._forward(tokens, all_logits)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed ``tokens`` [b, n] after what every row holds; logits as for :meth:`prefill`."""
        if self.context is None:
            raise RuntimeError("extend() before prefill()")
        return self._forward(tokens, all_logits)

    @torch.inference_mode()
    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep (and reorder, or repeat) the given rows: a beam search's surviving candidates,
        or the rows still generating. Only the filled part of the cache is copied."""
        assert self.context is not None and self.padding is not None
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.padding.device)
        filled = self.length
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in list(memory.items()):
            new_keys = keys.new_empty((keys.size(0), rows.numel()) + tuple(keys.shape[2:]))
            new_values = values.new_empty(new_keys.shape)
            new_keys[:filled] = keys[:filled].index_select(1, rows)
            new_values[:filled] = values[:filled].index_select(1, rows)
            memory[layer] = (new_keys, new_values)
        self.context.max_batch_size = int(rows.numel())
        self.padding = self.padding.index_select(0, rows)

    def _forward(self, tokens: torch.Tensor, all_logits: bool) -> torch.Tensor:
        assert self.context is not None and self.padding is not None
        b, n = tokens.shape
        if b != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} rows, got tokens for {b}")
        start, end = self.length, self.length + n
        if end > self.max_length:
            raise CacheFullError(f"{end} positions do not fit a cache of {self.max_length} "
                                 f"(the model's context length)")
        padding = self.padding[:, :end]
        # A row's positions count its real tokens only (learned position embeddings need that;
        # rotary ones are indifferent to the shift).
        position_ids = ((~padding).long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
        mask = None
        if bool(padding.any()):
            mask = padding[:, None, None, :].expand(b, 1, n, end)
        self.context.materialize_only_last_token_logits = not all_logits
        with compat.device_clean(), torch.inference_mode():
            out = self.model(tokens, position_ids, mask, inference_context=self.context,
                             runtime_gather_output=True)
        self.context.sequence_len_offset = end
        # [b, s, padded vocab] -> real ids only (the output layer is padded to a multiple of 128).
        logits = out[..., :self.vocab_size].float()
        return logits if all_logits else logits[:, -1, :]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, padding)`` [b, s]: each row right-aligned, padding True before it."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    padding = torch.ones((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            tokens[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            padding[i, width - len(r):] = False
    return tokens.to(device), padding.to(device)
