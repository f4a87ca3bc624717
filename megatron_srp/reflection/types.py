"""The data every SRP stage passes along: segments of a document and their safety labels.

Segmentation produces ``Segment``s, a classifier attaches a ``SafetyLabel`` to each, and an
intervention turns a ``ClassifiedDocument`` into zero or more output documents. Keeping these
plain, frozen and picklable lets stages run in worker processes (or Ray tasks) unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of a document: ``text == document_text[start:end]``."""

    index: int
    start: int  # character offsets into the document text
    end: int
    text: str
    num_tokens: int


@dataclass(frozen=True)
class SafetyLabel:
    """A classifier's verdict on one segment. ``category`` is a taxonomy code (e.g. "S10")
    or None; ``score`` is the probability-like confidence that the segment is unsafe.
    ``unparsed``: a judge's reply had no verdict in it, and ``safe`` is its policy's default
    (counted in the preprocessing summary and marked in the label sidecar)."""

    safe: bool
    category: Optional[str]
    score: float
    unparsed: bool = False


@dataclass(frozen=True)
class ClassifiedDocument:
    doc_id: str
    text: str
    segments: tuple[Segment, ...]
    labels: tuple[SafetyLabel, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.segments) != len(self.labels):
            raise ValueError(f"document {self.doc_id}: {len(self.segments)} segments but "
                             f"{len(self.labels)} labels")


class SafetyClassifier(Protocol):
    """Anything that labels a batch of segment texts. ``threshold`` maps scores to labels."""

    name: str

    def classify(self, texts: Sequence[str]) -> list[SafetyLabel]: ...

    def describe(self) -> dict[str, Any]: ...
