"""Segment documents and label every segment, once, for all the variants of a run.

Classification is the costly step of preprocessing, so a chunk's segments are classified in
one call and the resulting :class:`ClassifiedDocument` is handed to every intervention.
The ``oracle`` classifier reads a document-level label from the input record (every segment
of the document gets it); any other classifier sees the segment texts, or, when it reads token
ids of the dataset's own tokenizer (``classify_token_ids`` and a matching
``tokenizer_fingerprint``, as the shipped ``embedded`` classifier does), each segment's slice of
the document's ids, so nothing is tokenised twice. A slice can differ from encoding the
segment text alone in its first token's merge; the ``classify`` stage records which input the
classifier read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from megatron_srp.data.readers import Reject
from megatron_srp.documents import Document
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

    @property
    def reads_token_ids(self) -> bool:
        """The classifier reads ids of the tokenizer the dataset is built with."""
        return (hasattr(self.classifier, "classify_token_ids")
                and getattr(self.classifier, "tokenizer_fingerprint", None)
                == self.tokenizer.fingerprint)

    def describe(self) -> list[dict[str, Any]]:
        """The ``segment`` and ``classify`` entries of a dataset's ``stages``."""
        if self.classifier is None:
            return []
        reads = "records" if self.reads_records else (
            "token_ids" if self.reads_token_ids else "text")
        return [self._segmenter.describe(),
                {"name": "classify", "classifier": self.classifier.describe(), "reads": reads}]

    def label(self, docs: Sequence[Document]
              ) -> list[tuple[ClassifiedDocument | Reject, Optional[Any]]]:
        """Per document: its ClassifiedDocument (or a Reject) and its token encoding (None
        without a classifier), which the caller reuses for outputs whose text is unchanged."""
        if self.classifier is None:
            return [(ClassifiedDocument(d.doc_id, d.text, (), (), d.meta), None) for d in docs]
        encodings = self.tokenizer.encode_batch([d.text for d in docs]) if docs else []
        segmented = [tuple(self._segmenter.segments(d.text, encoding=e))
                     for d, e in zip(docs, encodings)]
        if self.reads_records:
            return [(self._oracle(d, s), e) for d, s, e in zip(docs, segmented, encodings)]
        if self.reads_token_ids:
            inputs = _segment_ids(segmented, encodings)
            labels = self.classifier.classify_token_ids(inputs) if inputs else []
        else:
            inputs = [seg.text for segments in segmented for seg in segments]
            labels = self.classifier.classify(inputs) if inputs else []
        if len(labels) != len(inputs):
            raise RuntimeError(f"classifier {self.classifier.name!r} returned {len(labels)} "
                               f"labels for {len(inputs)} segments")
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


def _segment_ids(segmented: Sequence[tuple], encodings: Sequence[Any]) -> list[np.ndarray]:
    """Each segment's slice of its document's ids (segments tile the document's tokens)."""
    rows = []
    for segments, encoding in zip(segmented, encodings):
        ids = (encoding.ids_array() if hasattr(encoding, "ids_array")
               else np.asarray(encoding.ids, dtype=np.int64))
        bounds = np.cumsum([0] + [seg.num_tokens for seg in segments])
        rows += [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return rows
