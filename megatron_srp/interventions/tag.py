"""Harmful-content metadata tags (Maini et al. 2025; SafeBeam reads them at inference).

In each unsafe segment, ``UNSAFE_TAG`` is inserted before each word independently with
probability ``p`` (5% was best in the paper); safe segments are never tagged. A word is a
maximal run of non-whitespace characters. The tag goes right before the whitespace that
precedes the word (directly before the word when it starts its segment), so the word keeps
its leading space and tokenizes exactly as in the untagged text (``"the<tag> word"``, not
``"the <tag>word"``). No whitespace is added or removed: ``text.replace(UNSAFE_TAG, "")``
gives back the input text exactly.

The coin flips come from a generator seeded by ``(seed, document id)``, so the output does
not depend on worker count or document order; another seed gives other positions.
``meta["unsafe_tags"]`` counts the tags inserted; ``meta["segment_spans"]`` gives each
segment's ``[start, end)`` in the output text, its tags included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from megatron_srp.documents import Document
from megatron_srp.interventions.base import (
    check_int,
    check_number,
    checked_pairs,
    describe_options,
    doc_rng,
    output_document,
)
from megatron_srp.reflection.types import ClassifiedDocument
from megatron_srp.taxonomy import UNSAFE_TAG

# a word and the whitespace before it (empty for the first word of a segment)
_WORD_RE = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class TagOptions:
    p: float = 0.05  # probability of a tag before each word of an unsafe segment
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("p", self.p, 0.0, 1.0)
        check_int("seed", self.seed, 0)


@dataclass(frozen=True)
class Tag:
    options: TagOptions = field(default_factory=TagOptions)
    name: ClassVar[str] = "tag"
    Options: ClassVar[type] = TagOptions

    def __call__(self, doc: ClassifiedDocument) -> list[Document]:
        pairs = checked_pairs(doc)
        rng = doc_rng(self.options.seed, doc.doc_id, self.name)
        pieces, cursor, tags, spans = [], 0, 0, []
        for seg, label in pairs:
            start = seg.start + tags * len(UNSAFE_TAG)  # tags before this segment shift it
            if not label.safe:
                for match in _WORD_RE.finditer(seg.text):
                    if rng.random() < self.options.p:
                        position = seg.start + match.start()
                        pieces.append(doc.text[cursor:position])
                        pieces.append(UNSAFE_TAG)
                        cursor = position
                        tags += 1
            spans.append([start, seg.end + tags * len(UNSAFE_TAG)])
        pieces.append(doc.text[cursor:])
        return [output_document(doc, self.name, "".join(pieces), unsafe_tags=tags,
                                segment_spans=spans)]

    def describe(self) -> dict[str, Any]:
        return describe_options(self.name, self.options)
