"""Sparse features for the embedded classifier: hashed n-grams of *token ids*.

The classifier reads the same byte-level BPE ids the dataset is built from, so preprocessing
hands it the slice of the document's encoding that each segment covers and nothing is
tokenised twice; a caller with plain text lets :meth:`TokenNgramFeaturizer.transform` encode it.

Each id is first mapped to a *canonical* id: its token string lower-cased, without the
byte-level space / newline markers, so "ĠKill", "kill" and "KILL"-pieces that spell the same
lower-cased string share a feature. Features are the canonical n-grams up to ``ngrams``
(uni- and bigrams by default; trigrams were no better on the held-out split), hashed into ``dim`` buckets with a fixed multiply-xor hash (the same in every
process), as L2-normalised term frequencies. Everything is numpy over the whole batch at once:
there is no per-token Python, which is what makes the classifier cheap next to tokenisation.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_HASH_SHIFT = np.uint64(40)  # keep the well-mixed high bits
CSR = tuple[np.ndarray, np.ndarray, np.ndarray]


def canonical_token_table(tokenizer: Any) -> np.ndarray:
    """``table[id]`` = a small integer naming the id's lower-cased, marker-free string."""
    raw = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer
    vocab = raw.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, dtype=np.uint64)
    names: dict[str, int] = {}
    for piece, index in sorted(vocab.items(), key=lambda kv: kv[1]):
        key = piece.replace("Ġ", "").replace("Ċ", "\n").lower().strip()
        table[index] = names.setdefault(key, len(names) + 1)
    return table


class TokenNgramFeaturizer:
    """Token ids -> CSR rows of hashed canonical n-gram counts (see the module docstring).

    ``tokenizer`` is the :class:`~megatron_srp.tokenizer.SRPTokenizer` the weights were
    trained with; ``max_tokens`` bounds a text's length (longer ones keep their start).
    """

    def __init__(self, tokenizer: Any, dim: int = 1 << 16, ngrams: int = 2,
                 max_tokens: int = 1024) -> None:
        if dim & (dim - 1):
            raise ValueError(f"dim must be a power of two, got {dim}")
        if ngrams < 1:
            raise ValueError(f"ngrams must be at least 1, got {ngrams}")
        self.tokenizer = tokenizer
        self.dim = dim
        self.ngrams = ngrams
        self.max_tokens = max_tokens
        self.table = canonical_token_table(tokenizer)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "ngrams": self.ngrams, "max_tokens": self.max_tokens}

    def transform(self, texts: Sequence[str]) -> CSR:
        """Encode ``texts`` with the tokenizer (ids only: no offsets are needed), then
        :meth:`transform_ids`."""
        ids = self.tokenizer.tokenize_batch(list(texts)) if len(texts) else []
        return self.transform_ids([np.asarray(row, dtype=np.int64) for row in ids])

    def transform_ids(self, rows: Sequence[np.ndarray]) -> CSR:
        """CSR pieces ``(indptr, indices, values)`` for ``len(rows)`` rows of ``dim`` columns:
        per row, the distinct buckets (sorted) and their L2-normalised counts."""
        n = len(rows)
        rows = [np.asarray(r, dtype=np.int64)[: self.max_tokens] for r in rows]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
        ids = np.concatenate(rows) if n else np.zeros(0, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.table)):
            raise ValueError(f"token ids outside the classifier's vocabulary of {len(self.table)}")
        canon = np.take(self.table, ids)
        # cell = row * dim + bucket, as int32 when every cell fits (int32 sorts 2x faster)
        cell_type = np.int32 if n * self.dim <= np.iinfo(np.int32).max else np.int64
        row_base = np.repeat(np.arange(n, dtype=cell_type) * cell_type(self.dim), lengths)
        row_start = np.zeros(len(ids) + 1, dtype=bool)
        row_start[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
        bucket = np.uint64(self.dim - 1)
        cells = []
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
            for k in range(1, self.ngrams + 1):
                m = len(ids) - k + 1
                if m <= 0:
                    break
                h = np.full(m, np.uint64(k), dtype=np.uint64)
                for j in range(k):
                    h = (h * _MULTIPLIER) ^ canon[j:j + m]
                h = (h * _MULTIPLIER) >> _HASH_SHIFT
                c = row_base[k - 1:] + (h & bucket).astype(cell_type)
                if k > 1:  # the n-gram lies inside one row: no row starts after its first token
                    crosses = np.logical_or.reduce([row_start[j:j + m] for j in range(1, k)])
                    c = c[~crosses]
                cells.append(c)
        if not cells:
            return np.zeros(n + 1, dtype=np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        unique, counts = np.unique(np.concatenate(cells), return_counts=True)
        unique = unique.astype(np.int64, copy=False)
        row_of = unique // self.dim
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=n), out=indptr[1:])
        values = counts.astype(np.float32)
        norms = np.sqrt(np.bincount(row_of, weights=values * values, minlength=n))
        values /= np.where(norms > 0, norms, 1).astype(np.float32)[row_of]
        return indptr, unique & (self.dim - 1), values


def sparse_matmul(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """``X @ weights`` for a CSR ``X``; empty rows give zeros."""
    n = len(indptr) - 1
    out = np.zeros((n, weights.shape[1]), dtype=np.float64)
    if len(indices) == 0:
        return out
    contrib = np.take(weights, indices, axis=0)  # about 4x faster than weights[indices]
    contrib *= values[:, None]
    nonempty = indptr[1:] > indptr[:-1]
    out[nonempty] = np.add.reduceat(contrib, indptr[:-1][nonempty], axis=0)
    return out


def csr_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray
             ) -> CSR:
    """The CSR of the given rows of ``(indptr, indices, values)``, in that order."""
    lengths = indptr[rows + 1] - indptr[rows]
    sub_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=sub_indptr[1:])
    picks = np.repeat(indptr[rows] - sub_indptr[:-1], lengths) + np.arange(sub_indptr[-1])
    return sub_indptr, indices[picks], values[picks]
