"""Log-probabilities as the server reports them: the prompt's own tokens scored in one forward
pass (what ``echo`` with ``logprobs`` returns, and what lm-eval's log-likelihood tasks read),
and the record of each drawn token, written out in OpenAI's two formats.

Evaluation harnesses score a continuation by asking for ``echo: true, logprobs: 1,
max_tokens: 1`` with context + continuation as the prompt, and summing the log-probabilities of
the continuation's tokens. Those come from the model's logits over the prompt (position ``i``
predicts token ``i + 1``), in float32, log-softmaxed over the real vocabulary: the same numbers
as ``log_softmax(model(prompt))`` offline. The first prompt token has nothing before it, so its
log-probability is ``null``, as in OpenAI's API.

The legacy completions format is ``{"tokens", "token_logprobs", "top_logprobs" (a dict per
token, text -> log-probability), "text_offset"}``; the chat format is ``{"content": [{"token",
"logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from megatron_srp.inference.sample import _device_of, _logits
from megatron_srp.token_offsets import _byte_of_char
from megatron_srp.tokenizer import SRPTokenizer

#: a log-probability below this is reported as this (JSON has no -inf)
FLOOR = -1e9


@dataclass(frozen=True)
class PromptScore:
    """The engine's "method" for scoring a prompt instead of continuing it: ``top``
    alternatives per position (0 = only the prompt token's own log-probability)."""

    top: int = 0
    max_new_tokens: int = 0


@dataclass
class TokenLogprob:
    """One token's log-probability, and the ``top`` most likely tokens at its position."""

    token: int
    logprob: Optional[float]  # None: the first prompt token
    top: list[tuple[int, float]] = field(default_factory=list)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def record(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The entry for ``token`` drawn from fp32 ``logits`` [vocab]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logp, top)
        best = [(i, _finite(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return TokenLogprob(token, _finite(float(logp[token])), best)


@torch.no_grad()
def score_prompts(model, tokenizer: SRPTokenizer, prompts: Sequence[Sequence[int]], top: int,
                  budget_tokens: int = 8192) -> list[list[TokenLogprob]]:
    """Each prompt's tokens with their log-probabilities given the tokens before them.

    Prompts are right-padded into batches of at most ``budget_tokens`` positions (the logits of
    a batch are [rows, positions, vocab] floats); with causal attention the padding after a
    prompt does not change its logits."""
    dev = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[TokenLogprob]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(prompts[order[end]]) * (end - start + 1) \
                    <= budget_tokens:
                end += 1
            rows = order[start:end]
            width = len(prompts[rows[-1]])
            batch = torch.full((len(rows), width), tokenizer.pad, dtype=torch.long, device=dev)
            for r, i in enumerate(rows):
                batch[r, :len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
            logp = torch.log_softmax(_logits(model, batch, tokenizer.vocab_size), dim=-1)
            for r, i in enumerate(rows):
                out[i] = _prompt_entries(logp[r], list(prompts[i]), top)
            start = end
    finally:
        model.train(was_training)
    return out


def _prompt_entries(logp: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    n = len(ids)
    entries = [TokenLogprob(ids[0], None, [])]
    if n < 2:
        return entries
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)
    own = logp[:n - 1].gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    best_v = best_i = None
    if top:
        best_v, best_i = torch.topk(logp[:n - 1], top, dim=-1)
        best_v, best_i = best_v.tolist(), best_i.tolist()
    for j in range(n - 1):
        alts = [(i, _finite(v)) for v, i in zip(best_v[j], best_i[j])] if top else []
        entries.append(TokenLogprob(ids[j + 1], _finite(own[j]), alts))
    return entries


# ---------------------------------------------------------------------------------- formats
def completion_logprobs(tokenizer: SRPTokenizer, entries: Sequence[TokenLogprob],
                        offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` object; ``offset`` is the first token's
    character offset in the choice's text."""
    tokens, offsets, tops = [], [], []
    for e in entries:
        piece = tokenizer.detokenize([e.token])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        alts: Optional[dict[str, float]] = None
        if e.logprob is not None:
            alts = {}
            for i, v in e.top:
                alts.setdefault(tokenizer.detokenize([i]), v)
        tops.append(alts)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: SRPTokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object."""
    def one(i: int, v: float) -> dict[str, Any]:
        return {"token": tokenizer.detokenize([i]), "logprob": v,
                "bytes": token_bytes(tokenizer, i)}

    return {"content": [{**one(e.token, e.logprob if e.logprob is not None else FLOOR),
                         "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries],
            "refusal": None}


def token_bytes(tokenizer: SRPTokenizer, token: int) -> list[int]:
    """The bytes a token spells: for a byte-level BPE its own bytes (a piece of a character
    too), otherwise the UTF-8 of its text."""
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is not None and tokenizer.byte_lengths() is not None:
        piece = inner.id_to_token(int(token))
        alphabet = _alphabet()
        if piece is not None and piece not in tokenizer.special_tokens \
                and all(c in alphabet for c in piece):
            return [alphabet[c] for c in piece]
    return list(tokenizer.detokenize([token]).encode("utf-8"))


@functools.lru_cache(maxsize=1)
def _alphabet() -> dict[str, int]:
    return _byte_of_char()
