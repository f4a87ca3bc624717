"""Data filtering (O'Brien et al. 2025; Maini et al. 2025's "score-0 only").

A segment counts as harmful when its label is unsafe and its score is ``>= threshold``
(the default 0.0 takes every unsafe label as it is). ``mode="segment"`` deletes the harmful
segments' text and keeps everything else, in order (text between segments included);
``mode="document"`` drops the whole document if any segment is harmful. A document left
empty (nothing but whitespace) produces no output. ``meta["filtered_segments"]`` lists the
indices of the deleted segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from megatron_srp.documents import Document
from megatron_srp.interventions.base import (
    check_choice,
    check_number,
    checked_pairs,
    describe_options,
    output_document,
)
from megatron_srp.reflection.types import ClassifiedDocument

FILTER_MODES = ("segment", "document")


@dataclass(frozen=True)
class FilterOptions:
    mode: str = "segment"  # "segment" | "document"
    threshold: float = 0.0  # unsafe segments with score >= threshold are harmful

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, FILTER_MODES)
        check_number("threshold", self.threshold, 0.0, 1.0)


@dataclass(frozen=True)
class Filter:
    options: FilterOptions = field(default_factory=FilterOptions)
    name: ClassVar[str] = "filter"
    Options: ClassVar[type] = FilterOptions

    def __call__(self, doc: ClassifiedDocument) -> list[Document]:
        pairs = checked_pairs(doc)
        harmful = [seg for seg, label in pairs
                   if not label.safe and label.score >= self.options.threshold]
        if harmful and self.options.mode == "document":
            return []
        pieces, cursor = [], 0
        for seg in harmful:
            pieces.append(doc.text[cursor:seg.start])
            cursor = seg.end
        pieces.append(doc.text[cursor:])
        text = "".join(pieces)
        if not text.strip():
            return []
        removed_before, spans = 0, []
        dropped = {seg.index for seg in harmful}
        for seg, _ in pairs:
            if seg.index in dropped:
                spans.append(None)
                removed_before += seg.end - seg.start
            else:
                spans.append([seg.start - removed_before, seg.end - removed_before])
        return [output_document(doc, self.name, text, segment_spans=spans,
                                filtered_segments=[seg.index for seg in harmful])]

    def describe(self) -> dict[str, Any]:
        return describe_options(self.name, self.options)
