"""Token character offsets from ids alone, for byte-level BPE tokenizers.

Asking ``tokenizers`` for offsets (``encode_batch`` instead of ``encode_batch_fast``) costs
about a third more tokenizer time, and reading them costs a Python tuple per token. For a
byte-level BPE with no normalizer and no post-processor, every token spells a fixed run of the
text's UTF-8 bytes, in order, so the offsets follow from a table of byte lengths per id: a
cumulative sum gives byte spans, and a byte -> character map (numpy) gives the character spans
``tokenizers`` reports (pieces of one multi-byte character share its span). Each document is
checked (the byte lengths must add up to the text's) and falls back to the tokenizer's own
offsets when they do not.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np


def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet: the printable character standing for each byte value
    (printable Latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def byte_length_table(tokenizer: Any) -> Optional[np.ndarray]:
    """``table[id]`` = how many UTF-8 bytes token ``id`` spells, or None when offsets cannot be
    derived this way (not a byte-level BPE, a normalizer or post-processor, an unknown piece).
    ``tokenizer`` is a ``tokenizers.Tokenizer``."""
    config = json.loads(tokenizer.to_str())
    pre = config.get("pre_tokenizer") or {}
    if (config.get("normalizer") is not None or config.get("post_processor") is not None
            or pre.get("type") != "ByteLevel" or config.get("model", {}).get("type") != "BPE"):
        return None
    alphabet = _byte_of_char()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for piece, index in vocab.items():
        if piece in added:
            table[index] = len(piece.encode("utf-8"))
        elif all(c in alphabet for c in piece):
            table[index] = len(piece)
        else:
            return None
    return table


class IdsEncoding:
    """What preprocessing reads of a ``tokenizers.Encoding`` (``ids``, ``len``, ``offsets``,
    ``char_to_token``), made from ids and the text; offsets are computed on first use."""

    __slots__ = ("ids", "_text", "_table", "_fallback", "_spans", "_array")

    def __init__(self, ids: list[int], text: str, table: np.ndarray, fallback: Any) -> None:
        self.ids = ids
        self._text = text
        self._table = table
        self._fallback = fallback  # text -> tokenizers.Encoding, when the bytes do not add up
        self._spans: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._array: Optional[np.ndarray] = None

    def ids_array(self) -> np.ndarray:
        """``ids`` as an int64 array (made once)."""
        if self._array is None:
            self._array = np.asarray(self.ids, dtype=np.int64)
        return self._array

    def __len__(self) -> int:
        return len(self.ids)

    def offset_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends): each token's character span, as ``tokenizers`` reports it."""
        if self._spans is None:
            self._spans = self._compute()
        return self._spans

    @property
    def offsets(self) -> list[tuple[int, int]]:
        starts, ends = self.offset_arrays()
        return list(zip(starts.tolist(), ends.tolist()))

    def char_to_token(self, char: int) -> Optional[int]:
        """The first token whose span holds character ``char`` (None outside the text)."""
        starts, ends = self.offset_arrays()
        i = int(np.searchsorted(ends, char, side="right"))
        return i if i < len(starts) and starts[i] <= char else None

    def _compute(self) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids_array()
        data = self._text.encode("utf-8")
        if not len(ids):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lengths = np.take(self._table, ids)
        ends_b = np.cumsum(lengths)
        if int(ends_b[-1]) != len(data) or int(lengths.min()) <= 0:
            table = np.asarray(self._fallback(self._text).offsets, dtype=np.int64).reshape(-1, 2)
            return table[:, 0].copy(), table[:, 1].copy()
        return char_spans(self._text, data, ends_b - lengths, ends_b)


def char_spans(text: str, data: bytes, starts: np.ndarray, ends: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Character spans of the byte spans ``[starts, ends)`` of ``data``, ``text``'s UTF-8 (every
    end at least 1): from the character holding the first byte to just past the one holding the
    last, as ``tokenizers`` reports a token that is part of a character. For ASCII text the
    byte offsets are the character offsets."""
    if len(data) == len(text):
        return starts, ends
    lead = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80
    # characters begun up to and including each byte; one past the end counts one more
    through = np.cumsum(np.append(lead, True))
    return through[starts] - 1, through[ends - 1]


def encode_with_offsets(tokenizer: Any, table: np.ndarray, texts: Sequence[str]
                        ) -> list[IdsEncoding]:
    """``tokenizer.encode_batch`` for ``texts`` at ``encode_batch_fast``'s cost (see the module
    docstring); ``tokenizer`` is a ``tokenizers.Tokenizer`` and ``table`` its
    :func:`byte_length_table`."""
    def fallback(text: str) -> Any:
        return tokenizer.encode(text, add_special_tokens=False)

    encodings = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [IdsEncoding(e.ids, text, table, fallback) for e, text in zip(encodings, texts)]
