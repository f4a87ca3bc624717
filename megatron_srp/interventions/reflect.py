"""Safety Reflection Pretraining: a reflection the model learns to predict after each segment.

With ``every_segment=True`` (the SRP default) the output text is exactly
``seg1 + refl1 + seg2 + refl2 + ...``: each reflection is inserted at the end of its segment
and nothing else changes, so deleting the reflections gives back the input text. Text that
lies between segments (a segmenter may leave gaps) stays where it was, after the preceding
reflection. With ``every_segment=False`` one reflection closes the document: ``Unsafe`` if
any segment is unsafe, with the category of the highest-scoring unsafe segment (the first
on ties), otherwise ``Safe``. A document without segments gets no reflection.

The output's ``meta`` records where things landed in the output text, as ``[start, end)``
character spans: ``reflection_spans`` (one per reflection, in order) and ``reflection_labels``
(``{"safe", "category"}`` for each, the category ``None`` when ``include_category=False``);
with ``every_segment=True`` also ``segment_spans`` (one per input segment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, ClassVar

from megatron_srp.documents import Document
from megatron_srp.interventions.base import (
    check_bool,
    checked_pairs,
    describe_options,
    output_document,
)
from megatron_srp.reflection.types import ClassifiedDocument, SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy, format_reflection


@dataclass(frozen=True)
class ReflectOptions:
    every_segment: bool = True  # False: a single reflection at the end of the document
    include_category: bool = True  # False: "Unsafe" without the hazard code

    def __post_init__(self) -> None:
        check_bool("every_segment", self.every_segment)
        check_bool("include_category", self.include_category)


@dataclass(frozen=True)
class Reflect:
    options: ReflectOptions = field(default_factory=ReflectOptions)
    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    name: ClassVar[str] = "reflect"
    Options: ClassVar[type] = ReflectOptions

    def _reflection(self, doc_id: str, label: SafetyLabel) -> tuple[str, dict[str, Any]]:
        category = None if label.safe or not self.options.include_category else label.category
        # An unsafe label without a category (a judge reply with no verdict, a classifier that
        # names none) gets a bare "Unsafe".
        with_category = self.options.include_category and (label.safe or category is not None)
        try:
            text = format_reflection(label.safe, category, with_category,
                                     taxonomy=self.taxonomy)
        except ValueError as exc:
            raise ValueError(f"document {doc_id!r}: cannot write reflection for {label}: {exc}"
                             ) from exc
        return text, {"safe": label.safe, "category": category}

    def __call__(self, doc: ClassifiedDocument) -> list[Document]:
        pairs = checked_pairs(doc)
        if self.options.every_segment:
            inserts = [(seg.end, label) for seg, label in pairs]
        elif pairs:
            unsafe = [label for _, label in pairs if not label.safe]
            # max() keeps the first of equal scores
            verdict = (max(unsafe, key=lambda label: label.score) if unsafe
                       else SafetyLabel(safe=True, category=None, score=0.0))
            inserts = [(len(doc.text), verdict)]
        else:
            inserts = []

        pieces: list[str] = []
        spans: list[list[int]] = []
        labels: list[dict[str, Any]] = []
        cursor = length = 0
        for position, label in inserts:
            pieces.append(doc.text[cursor:position])
            length += position - cursor
            cursor = position
            reflection, record = self._reflection(doc.doc_id, label)
            pieces.append(reflection)
            spans.append([length, length + len(reflection)])
            labels.append(record)
            length += len(reflection)
        pieces.append(doc.text[cursor:])
        meta: dict[str, Any] = {"reflection_spans": spans, "reflection_labels": labels}
        if self.options.every_segment:
            # segment i ends where reflection i starts; it moved right by the reflections before it
            offsets = list(accumulate([0] + [end - start for start, end in spans]))
            meta["segment_spans"] = [[seg.start + off, seg.end + off]
                                     for (seg, _), off in zip(pairs, offsets)]
        return [output_document(doc, self.name, "".join(pieces), **meta)]

    def describe(self) -> dict[str, Any]:
        return describe_options(self.name, self.options, taxonomy=self.taxonomy.name)
