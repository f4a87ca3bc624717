"""The baseline variant: every document passes through unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from megatron_srp.documents import Document
from megatron_srp.interventions.base import checked_pairs, describe_options, output_document
from megatron_srp.reflection.types import ClassifiedDocument


@dataclass(frozen=True)
class RawOptions:
    """No options."""


@dataclass(frozen=True)
class Raw:
    """Identity: one output document with the input's id and exact text."""

    options: RawOptions = field(default_factory=RawOptions)
    name: ClassVar[str] = "raw"
    Options: ClassVar[type] = RawOptions

    def __call__(self, doc: ClassifiedDocument) -> list[Document]:
        spans = [[seg.start, seg.end] for seg, _ in checked_pairs(doc)]
        return [output_document(doc, self.name, doc.text, segment_spans=spans)]

    def describe(self) -> dict[str, Any]:
        return describe_options(self.name, self.options)
