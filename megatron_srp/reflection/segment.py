"""Cut documents into segments of about ``segment_tokens`` tokens at sentence boundaries.

SRP inserts a reflection after every segment, so a segment should end where a reader would
pause: at a sentence end. The text is tokenised once with character offsets; every cut is a
token boundary (never inside a token, never inside a multi-byte character), so the segments'
texts concatenate back to the document exactly, whitespace included, and each segment's
``num_tokens`` is the number of tokens its span covers in the whole-document tokenisation.

Choosing a cut, given the position ``pos`` where the current segment starts: among the
boundaries whose segment length lies in ``[min_fraction, max_fraction] x segment_tokens``,
take the one closest to ``segment_tokens``, trying in order (1) sentence ends from the
sentence splitter and paragraph breaks (blank lines), (2) any line break, (3) word starts,
(4) any token boundary. Within a tier, a cut that leaves a final remainder of at least
``min_fraction x segment_tokens`` is preferred. The last segment is at most the maximum; it is
short only when the document is, or when no better cut exists (then it is merged into the
previous one if the merge stays within the maximum).

Sentence splitters: ``"blingfire"`` (default; a fast C++ finite-state splitter, see
docs/srp.md for the measurements) and ``"regex"`` (no extra package).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, Sequence

import numpy as np

from megatron_srp.documents import Document
from megatron_srp.reflection.types import Segment
from megatron_srp.token_offsets import char_spans

SPLITTERS = ("blingfire", "regex")
DEFAULT_SPLITTER = "blingfire"
META_KEY = "segments"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SegmentConfig:
    """How long segments should be, and which sentence splitter finds the boundaries."""

    segment_tokens: int = 256
    min_fraction: float = 0.5
    max_fraction: float = 1.5
    splitter: str = DEFAULT_SPLITTER

    def __post_init__(self) -> None:
        st = self.segment_tokens
        if isinstance(st, bool) or not isinstance(st, int) or st < 1:
            raise ValueError(f"segment_tokens must be a positive integer, got {st!r}")
        for field_name in ("min_fraction", "max_fraction"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{field_name} must be a finite number, got {value!r}")
        if not 0 < self.min_fraction <= 1:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction!r}")
        if self.max_fraction < 1:
            raise ValueError(f"max_fraction must be >= 1, got {self.max_fraction!r}")
        if self.splitter not in SPLITTERS:
            raise ValueError(
                f"splitter must be one of {', '.join(SPLITTERS)}, got {self.splitter!r}"
            )

    @property
    def min_tokens(self) -> int:
        """Smallest length a segment other than the last may have."""
        return max(1, math.ceil(self.min_fraction * self.segment_tokens - 1e-9))

    @property
    def max_tokens(self) -> int:
        """Largest length any segment may have (when the tokenisation allows a cut at all)."""
        return max(self.segment_tokens, math.floor(self.max_fraction * self.segment_tokens + 1e-9))


# --------------------------------------------------------------------------- splitters


class SentenceSplitter(Protocol):
    name: str
    version: str

    def sentence_ends(self, text: str) -> list[int]:
        """Character offsets just after each sentence's last non-space character."""
        ...


class RegexSplitter:
    """Sentence ends: ``.``, ``!``, ``?`` (runs of them, plus closing quotes or brackets)
    followed by whitespace or the end of the text. No abbreviation handling."""

    name = "regex"
    version = "1"
    _PATTERN = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)")

    def sentence_ends(self, text: str) -> list[int]:
        return [m.end() for m in self._PATTERN.finditer(text)]


class BlingfireSplitter:
    """``blingfire.text_to_sentences_and_offsets`` (its model is compiled into the wheel's
    shared library, so it works offline). The wheel ships a Linux x86-64 library only."""

    name = "blingfire"

    def __init__(self) -> None:
        try:
            import blingfire
        except (ImportError, OSError) as exc:
            raise ImportError(
                "splitter 'blingfire' needs the blingfire package (pip install blingfire==0.1.8; "
                "Linux x86-64, macOS and Windows only); use SegmentConfig(splitter='regex') "
                f"instead: {exc}"
            ) from exc
        from importlib.metadata import PackageNotFoundError, version

        self._blingfire = blingfire
        try:
            self.version = version("blingfire")
        except PackageNotFoundError:  # pragma: no cover - vendored copy
            self.version = "unknown"

    def sentence_spans(self, text: str) -> list[tuple[int, int]]:
        """``blingfire.text_to_sentences_and_offsets(text)[1]``, with the UTF-8 byte -> character
        offset mapping done in numpy (the wrapper loops over every byte in Python, which was
        the slowest part of segmentation) and the output buffers kept between calls."""
        from ctypes import byref, c_char_p, c_int

        data = text.encode("utf-8")
        size = len(data) * 2
        out, starts, ends = self._buffers(size)
        n = self._blingfire.blingfire.TextToSentencesWithOffsets(
            c_char_p(data), c_int(len(data)), byref(out), byref(starts), byref(ends), c_int(size))
        if n == -1 or n > size:
            return []
        if n < len(out):
            out[n] = b"\0"  # the buffer is reused: never read a longer earlier output
        count = out.value.count(b"\n") + 1
        b = np.frombuffer(starts, dtype=np.int32, count=count)
        e = np.frombuffer(ends, dtype=np.int32, count=count) + 1
        if b.min(initial=0) < 0 or e.min(initial=1) < 1 or e.max(initial=0) > len(data):
            return []
        b, e = char_spans(text, data, b, e)
        return list(zip(b.tolist(), e.tolist()))

    def _buffers(self, size: int) -> tuple[Any, Any, Any]:
        """Output text, start and end buffers of at least ``size`` entries, grown by doubling
        (allocating and zeroing fresh ones per document cost as much as the split)."""
        from ctypes import c_int32, create_string_buffer

        held = getattr(self, "_held", None)
        if held is None or held[0] < size:
            capacity = max(size, 2 * held[0] if held else 1 << 16)
            held = self._held = (capacity, create_string_buffer(capacity),
                                 (c_int32 * capacity)(), (c_int32 * capacity)())
        return held[1:]

    def sentence_ends(self, text: str) -> list[int]:
        if not text.strip():
            return []  # blingfire asserts on empty / whitespace-only input
        spans = self.sentence_spans(text)
        ends = []
        for start, end in spans:
            if 0 <= start < end <= len(text):
                while end > start and text[end - 1].isspace():
                    end -= 1
                ends.append(end)
        return ends


@lru_cache(maxsize=None)
def get_splitter(name: str) -> SentenceSplitter:
    """The (cached, per process) splitter called ``name``."""
    if name == "regex":
        return RegexSplitter()
    if name == "blingfire":
        return BlingfireSplitter()
    raise ValueError(f"splitter must be one of {', '.join(SPLITTERS)}, got {name!r}")


# --------------------------------------------------------------------------- segmentation

_BLANK_LINE_END = re.compile(r"\n[ \t\r\f\v]*\n")
_NEWLINE = re.compile(r"\n")


def _token_offsets(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # SRPTokenizer or a tokenizers.Tokenizer
    return hf.encode(text, add_special_tokens=False).offsets


def _offset_arrays(offsets: Any) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of a sequence of ``(start, end)`` tuples, or of an encoding that has
    them as arrays already (:class:`~megatron_srp.token_offsets.IdsEncoding`)."""
    if hasattr(offsets, "offset_arrays"):
        return offsets.offset_arrays()
    n = len(offsets)
    flat = itertools.chain.from_iterable(offsets)  # fromiter: about 2x np.asarray on tuples
    table = np.fromiter(flat, dtype=np.int64, count=2 * n).reshape(n, 2)
    return table[:, 0], table[:, 1]


def _token_tables(offsets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, clean, next_clean) as arrays: ``starts[i]`` the first character of token
    ``i``; ``clean[i]``: a cut before token ``i`` is clean, i.e. token ``i`` starts where the
    tokens before it end (byte-level pieces of one multi-byte character share its span);
    ``next_clean[i]``: the first clean index >= ``i`` (``n`` if none)."""
    starts, ends = _offset_arrays(offsets)
    n = len(starts)
    clean = np.zeros(n, dtype=bool)
    clean[1:] = starts[1:] >= ends[:-1]
    candidates = np.where(clean, np.arange(n), n)
    next_clean = np.minimum.accumulate(candidates[::-1])[::-1]
    return starts, clean, next_clean


def _to_cuts(positions: Sequence[int], starts: np.ndarray, next_clean: np.ndarray
             ) -> list[int]:
    """Token indices of the clean boundaries at or just after the given character positions
    (the first token starting at or after each position, moved on to the next clean one)."""
    n = len(starts)
    if not len(positions):
        return []
    i = np.searchsorted(starts, np.asarray(positions, dtype=np.int64), side="left")
    i = i[(i > 0) & (i < n)]
    i = next_clean[i]
    return sorted(set(i[i < n].tolist()))  # np.unique costs more on a few dozen values


def _closest(cuts: list[int], lo: int, hi: int, target: int) -> int | None:
    """The element of sorted ``cuts`` in ``[lo, hi]`` closest to ``target`` (earlier on ties)."""
    if lo > hi:
        return None
    i = bisect.bisect_left(cuts, target)
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(cuts) and lo <= cuts[j] <= hi:
            if best is None or abs(cuts[j] - target) < abs(best - target):
                best = cuts[j]
    if best is None:  # target outside [lo, hi]: nearest element inside it
        a, b = bisect.bisect_left(cuts, lo), bisect.bisect_right(cuts, hi)
        if a < b:
            best = cuts[a] if abs(cuts[a] - target) <= abs(cuts[b - 1] - target) else cuts[b - 1]
    return best


def segment_text(
    text: str,
    tokenizer: Any,
    config: SegmentConfig | None = None,
    splitter: SentenceSplitter | None = None,
    offsets: Sequence[tuple[int, int]] | None = None,
    encoding: Any = None,
) -> list[Segment]:
    """Cut ``text`` into :class:`Segment`s that cover it exactly, in order.

    ``tokenizer`` is an :class:`~megatron_srp.tokenizer.SRPTokenizer` or a
    ``tokenizers.Tokenizer``; ``splitter`` overrides ``config.splitter``. ``offsets`` are the
    text's token offsets when the caller already encoded it; or give its ``encoding`` (a
    ``tokenizers.Encoding``, whose offsets are then only read for a text that is cut, since
    reading them builds a Python tuple per token; or an
    :class:`~megatron_srp.token_offsets.IdsEncoding`, whose offsets are arrays).
    """
    config = config or SegmentConfig()
    if not text:
        return []
    if offsets is None and encoding is not None:
        if len(encoding) <= config.max_tokens:
            return [Segment(index=0, start=0, end=len(text), text=text, num_tokens=len(encoding))]
        offsets = encoding if hasattr(encoding, "offset_arrays") else encoding.offsets
    if offsets is None:
        offsets = _token_offsets(text, tokenizer)
    n = len(offsets)
    if n <= config.max_tokens:
        return [Segment(index=0, start=0, end=len(text), text=text, num_tokens=n)]

    starts, valid, next_clean = _token_tables(offsets)
    splitter = splitter or get_splitter(config.splitter)
    sentence_like = set(splitter.sentence_ends(text))
    sentence_like.update(m.end() for m in _BLANK_LINE_END.finditer(text))
    tiers = [
        _to_cuts(sorted(sentence_like), starts, next_clean),
        _to_cuts([m.end() for m in _NEWLINE.finditer(text)], starts, next_clean),
    ]

    budget, lo, hi = config.segment_tokens, config.min_tokens, config.max_tokens

    def word_start(i: int) -> bool:
        c = int(starts[i])
        return valid[i] and (text[c : c + 1].isspace() or text[c - 1 : c].isspace())

    def choose(pos: int) -> int:
        target, a, b = pos + budget, pos + lo, min(pos + hi, n - 1)
        b_keep_tail = min(b, n - lo)  # leave a final segment of at least `lo` tokens if we can
        for cuts in tiers:
            for upper in (b_keep_tail, b):
                c = _closest(cuts, a, upper, target)
                if c is not None:
                    return c
        for pred in (word_start, lambda i: valid[i]):
            for upper in (b_keep_tail, b):
                lo_t = min(max(target, a), upper)
                for d in range(0, max(upper - a, 0) + 1):
                    for c in (lo_t - d, lo_t + d):
                        if a <= c <= upper and pred(c):
                            return c
        c = pos + 1  # no clean cut in the window (tiny budgets): first clean one after pos
        while c < n and not valid[c]:
            c += 1
        return c

    cuts = [0]
    while n - cuts[-1] > hi:
        c = choose(cuts[-1])
        if c >= n:
            break
        cuts.append(c)
    cuts.append(n)
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < lo and cuts[-1] - cuts[-3] <= hi:
        del cuts[-2]

    chars = [0] + starts[cuts[1:-1]].tolist() + [len(text)]
    return [
        Segment(index=k, start=chars[k], end=chars[k + 1], text=text[chars[k] : chars[k + 1]],
                num_tokens=cuts[k + 1] - cuts[k])
        for k in range(len(cuts) - 1)
    ]


# --------------------------------------------------------------------------- pipeline stage


class SegmentStage:
    """Pipeline stage: ``doc.meta["segments"]`` = the document's :class:`Segment`s.

    The tokenizer and splitter are loaded on first use and dropped when pickled, so the stage
    is cheap to ship to worker processes. ``tokenizer_dir`` defaults to the packaged tokenizer;
    it must be the tokenizer the dataset is built with, or ``num_tokens`` will not match. A
    ``tokenizer`` object given instead travels with the stage.
    """

    name: ClassVar[str] = "segment"

    def __init__(self, config: SegmentConfig | None = None, tokenizer_dir: str | Path | None = None,
                 tokenizer: Any = None):
        self.config = config or SegmentConfig()
        self.tokenizer_dir = str(tokenizer_dir) if tokenizer_dir is not None else None
        self._given_tokenizer = tokenizer  # an SRPTokenizer already loaded (it pickles)
        self._tokenizer = tokenizer
        self._splitter: SentenceSplitter | None = None

    def _load(self) -> tuple[Any, SentenceSplitter]:
        if self._tokenizer is None:
            from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

            self._tokenizer = SRPTokenizer.from_dir(self.tokenizer_dir or default_tokenizer_dir())
        if self._splitter is None:
            self._splitter = get_splitter(self.config.splitter)
        return self._tokenizer, self._splitter

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "tokenizer_dir": self.tokenizer_dir,
                "tokenizer": self._given_tokenizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["tokenizer_dir"], state.get("tokenizer"))

    def __call__(self, doc: Document) -> Iterator[Document]:
        yield replace(doc, meta={**doc.meta, META_KEY: self.segments(doc.text)})

    def segments(self, text: str, offsets: Sequence[tuple[int, int]] | None = None,
                 encoding: Any = None) -> list[Segment]:
        """:func:`segment_text` with this stage's tokenizer, splitter and config."""
        tokenizer, splitter = self._load()
        return segment_text(text, tokenizer, self.config, splitter=splitter, offsets=offsets,
                            encoding=encoding)

    def describe(self) -> dict[str, Any]:
        tokenizer, splitter = self._load()
        return {
            "name": self.name,
            "segment_tokens": self.config.segment_tokens,
            "min_fraction": self.config.min_fraction,
            "max_fraction": self.config.max_fraction,
            "splitter": splitter.name,
            "splitter_version": splitter.version,
            "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint,
        }

    def __repr__(self) -> str:
        return f"SegmentStage(config={self.config!r}, tokenizer_dir={self.tokenizer_dir!r})"
