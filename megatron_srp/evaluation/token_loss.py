"""Mean next-token loss by kind of token: on the reflection tokens of held-out SRP text (what
continued pretraining with SRP should teach) and on the ordinary text around them (what it
should not spoil).

A document is scored as training sees it: preceded by the end-of-document token, in windows
of the model's context that overlap by one token, so every token after that first one is
predicted once. Each predicted token is counted under its kind:

* ``reflection_open``: ``<|reflect|>`` itself (the model deciding to reflect here);
* ``reflection_body``: the tokens after it up to and including ``<|/reflect|>`` (the verdict,
  ``Safe`` / ``Unsafe: S10``, and the closer);
* ``reflection``: both of the above;
* ``text``: every other token except the end-of-document token;
* ``eod``: end-of-document tokens (the one that closes each document of a preprocessed
  dataset).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TEXT, OPEN, BODY, EOD = 0, 1, 2, 3
KINDS = {"text": (TEXT,), "reflection_open": (OPEN,), "reflection_body": (BODY,),
         "reflection": (OPEN, BODY), "eod": (EOD,)}


def token_kinds(ids: Sequence[int], open_id: int, close_id: int, eod_id: int) -> np.ndarray:
    """The kind of every token of ``ids`` (``TEXT``, ``OPEN``, ``BODY``, ``EOD``). A reflection
    that is not closed before the ids end runs to the end."""
    kinds = np.full(len(ids), TEXT, dtype=np.int8)
    inside = False
    for i, t in enumerate(ids):
        if t == open_id:
            kinds[i], inside = OPEN, True
        elif inside:
            kinds[i] = BODY
            inside = t != close_id
        elif t == eod_id:
            kinds[i] = EOD
    return kinds


@dataclass
class TokenLoss:
    """Summed loss and token count per kind; ``mean(kind)`` is the mean cross-entropy (nats)."""
    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in KINDS})
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    documents: int = 0

    def add(self, nll: np.ndarray, kinds: np.ndarray) -> None:
        for name, members in KINDS.items():
            mask = np.isin(kinds, members)
            self.sums[name] += float(nll[mask].sum())
            self.counts[name] += int(mask.sum())

    def mean(self, kind: str) -> Optional[float]:
        return self.sums[kind] / self.counts[kind] if self.counts[kind] else None

    def as_dict(self) -> dict:
        return {"documents": self.documents,
                **{k: {"loss": self.mean(k), "tokens": self.counts[k]} for k in KINDS}}


def windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Pieces of ``window + 1`` ids (the last may be shorter) overlapping by one id, so that
    every id after the first is a target once."""
    pieces = [list(ids[i:i + window + 1]) for i in range(0, len(ids) - 1, window)]
    return [p for p in pieces if len(p) >= 2]


@torch.no_grad()
def token_losses(logits_fn: Callable[[torch.Tensor], torch.Tensor],
                 documents: Iterable[Sequence[int]], *, open_id: int, close_id: int, eod_id: int,
                 window: int, batch_size: int = 4) -> TokenLoss:
    """Loss by kind over ``documents`` (token ids, without the leading end-of-document token,
    which is added). ``logits_fn`` maps ids ``[b, s]`` to logits ``[b, s, vocab]``."""
    result = TokenLoss()
    full: list[tuple[list[int], np.ndarray]] = []

    def flush(batch: list[tuple[list[int], np.ndarray]]) -> None:
        if not batch:
            return
        ids = torch.tensor([p for p, _ in batch])
        logits = logits_fn(ids[:, :-1]).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").reshape(len(batch), -1).cpu().numpy()
        for row, (_, kinds) in zip(nll, batch):
            result.add(row, kinds[1:])

    for doc in documents:
        ids = [eod_id] + [int(t) for t in doc]
        kinds = token_kinds(ids, open_id, close_id, eod_id)
        kinds[0] = EOD
        result.documents += 1
        for start, piece in zip(range(0, len(ids) - 1, window), windows(ids, window)):
            item = (piece, kinds[start:start + len(piece)])
            if len(piece) == window + 1:
                full.append(item)
                if len(full) == batch_size:
                    flush(full)
                    full = []
            else:
                flush([item])
    flush(full)
    return result


def dataset_token_losses(model, tokenizer, prefix: str | Path, max_documents: Optional[int] = None,
                         window: Optional[int] = None, batch_size: int = 4) -> TokenLoss:
    """:func:`token_losses` of a loaded model (``load_for_inference``) over the first
    ``max_documents`` documents of a preprocessed dataset, whose tokenizer must be the model's."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_srp.evaluation.reflection_accuracy import dataset_tokenizer
    from megatron_srp.inference.sample import _context_length, _device_of, _logits

    data_tok = dataset_tokenizer(prefix)
    if data_tok.fingerprint != tokenizer.fingerprint:
        raise ValueError(f"dataset {prefix} was tokenized with {data_tok.fingerprint}, the model "
                         f"uses {tokenizer.fingerprint}")
    dataset = IndexedDataset(str(prefix))
    n = len(dataset) if max_documents is None else min(max_documents, len(dataset))
    dev = _device_of(model)
    return token_losses(lambda ids: _logits(model, ids.to(dev), tokenizer.vocab_size),
                        (dataset[i] for i in range(n)), open_id=tokenizer.reflect_open_id,
                        close_id=tokenizer.reflect_close_id, eod_id=tokenizer.eod,
                        window=window or _context_length(model), batch_size=batch_size)
