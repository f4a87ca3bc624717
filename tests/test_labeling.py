"""The Labeler hands the embedded classifier each segment's slice of the document's token ids
when they share a tokenizer, and the segment texts otherwise; both give the same verdicts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from megatron_srp.data.labeling import Labeler
from megatron_srp.documents import Document
from megatron_srp.reflection.classifiers import EmbeddedClassifier
from megatron_srp.reflection.segment import SegmentConfig
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir


@pytest.fixture(scope="module")
def docs(shared_data) -> list[Document]:
    """Long real documents (several segments each): unsafe and safe dialogue, and prose."""
    out = []
    with open(shared_data / "do_not_answer" / "do_not_answer_responses.jsonl",
              encoding="utf-8") as f:
        for i, line in zip(range(60), f):
            record = json.loads(line)
            out.append(Document(f"dna-{i}", f"{record['question']}\n\n{record['text']}"))
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    out += [Document(f"tiny-{i}", text[i * 6000:(i + 1) * 6000]) for i in range(20)]
    return out


def test_token_ids_and_texts_give_the_same_labels(docs):
    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    clf = EmbeddedClassifier()
    config = SegmentConfig(segment_tokens=64)
    fast = Labeler(clf, config, tok)
    assert fast.reads_token_ids and fast.describe()[1]["reads"] == "token_ids"

    other = copy.copy(clf)
    other.tokenizer_fingerprint = "trained-on-another-tokenizer"
    slow = Labeler(other, config, tok)
    assert not slow.reads_token_ids and slow.describe()[1]["reads"] == "text"

    by_ids = [c for c, _ in fast.label(docs)]
    by_text = [c for c, _ in slow.label(docs)]
    segments = [s for c in by_ids for s in c.segments]
    assert len(segments) > 3 * len(docs)
    assert [s for c in by_text for s in c.segments] == segments
    # The text path is exactly the classifier on the segment texts.
    texts = [s.text for s in segments]
    assert [lab for c in by_text for lab in c.labels] == clf.classify(texts)
    ids_labels = [lab for c in by_ids for lab in c.labels]
    text_labels = [lab for c in by_text for lab in c.labels]
    # A slice of the document's ids may merge its first token differently from encoding the
    # segment alone; nothing else differs.
    agree = np.mean([a.safe == b.safe for a, b in zip(ids_labels, text_labels)])
    assert agree >= 0.98, agree
    gaps = np.abs([a.score - b.score for a, b in zip(ids_labels, text_labels)])
    assert np.median(gaps) < 1e-6 and gaps.max() < 0.2
    assert any(not lab.safe for lab in ids_labels) and any(lab.safe for lab in ids_labels)
