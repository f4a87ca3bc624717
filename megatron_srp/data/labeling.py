"""Segment documents and label every segment, once, for all the variants of a run.

Classification is the costly step of preprocessing, so a chunk's segments are classified in
one call and the resulting :class:`ClassifiedDocument` is handed to every intervention.
The ``oracle`` classifier reads a document-level label from the input record (every segment
of the document gets it); any other classifier sees the segment texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_srp.data.pipeline import Document
from megatron_srp.data.readers import Reject
from megatron_srp.reflection.segment import SegmentConfig, SegmentStage
from megatron_srp.reflection.types import ClassifiedDocument


@dataclass
class Labeler:
    """``label(docs) -> one ClassifiedDocument or Reject per doc``; picklable, lazy."""

    classifier: Any  # a SafetyClassifier, or None: documents pass through unsegmented
    segment_config: SegmentConfig
    tokenizer: Any  # the SRPTokenizer the dataset is built with (segment token counts)

    def __post_init__(self) -> None:
        self._segmenter = SegmentStage(self.segment_config, tokenizer=self.tokenizer)

    @property
    def reads_records(self) -> bool:
        """The oracle labels whole records instead of reading segment texts."""
        return hasattr(self.classifier, "classify_records")

    def describe(self) -> list[dict[str, Any]]:
        """The ``segment`` and ``classify`` entries of a dataset's ``stages``."""
        if self.classifier is None:
            return []
        return [self._segmenter.describe(),
                {"name": "classify", "classifier": self.classifier.describe()}]

    def label(self, docs: Sequence[Document]
              ) -> list[tuple[ClassifiedDocument | Reject, Optional[Any]]]:
        """Per document: its ClassifiedDocument (or a Reject) and its token encoding (None
        without a classifier), which the caller reuses for outputs whose text is unchanged."""
        if self.classifier is None:
            return [(ClassifiedDocument(d.doc_id, d.text, (), (), d.meta), None) for d in docs]
        encodings = self.tokenizer.encode_batch([d.text for d in docs]) if docs else []
        segmented = [tuple(self._segmenter.segments(d.text, e.offsets))
                     for d, e in zip(docs, encodings)]
        if self.reads_records:
            return [(self._oracle(d, s), e) for d, s, e in zip(docs, segmented, encodings)]
        texts = [seg.text for segments in segmented for seg in segments]
        labels = self.classifier.classify(texts) if texts else []
        if len(labels) != len(texts):
            raise RuntimeError(f"classifier {self.classifier.name!r} returned {len(labels)} "
                               f"labels for {len(texts)} segments")
        out: list[tuple[ClassifiedDocument | Reject, Optional[Any]]] = []
        cursor = 0
        for d, segments, e in zip(docs, segmented, encodings):
            labelled = tuple(labels[cursor:cursor + len(segments)])
            out.append((ClassifiedDocument(d.doc_id, d.text, segments, labelled, d.meta), e))
            cursor += len(segments)
        return out

    def _oracle(self, doc: Document, segments: tuple) -> ClassifiedDocument | Reject:
        try:
            (label,) = self.classifier.classify_records([doc.meta.get("fields", {})])
        except (ValueError, KeyError) as exc:
            reason = str(exc).strip("'\"").replace("record 0", "the record")
            return Reject(doc.meta.get("source", doc.doc_id), doc.meta.get("line"),
                          doc.meta.get("row"), f"oracle label: {reason}", doc.text[:200])
        return ClassifiedDocument(doc.doc_id, doc.text, segments, (label,) * len(segments),
                                  doc.meta)
