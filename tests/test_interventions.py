"""Interventions on real text: ToxiGen statements (labelled) and tinyshakespeare (all safe).

Segments come from a simple sentence splitter written here, so these tests do not depend on
the real segmenter. A ToxiGen unsafe statement is hazard category S10 (Hate); its score is a
deterministic spread over [0.5, 0.95] so that thresholds have something to cut.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
from pathlib import Path

import pytest

from megatron_srp.interventions import INTERVENTIONS, build_intervention
from megatron_srp.reflection.types import ClassifiedDocument, SafetyLabel, Segment
from megatron_srp.taxonomy import REFLECT_CLOSE, REFLECT_OPEN, UNSAFE_TAG, parse_reflection

_REFLECTION_RE = re.compile(re.escape(REFLECT_OPEN) + ".*?" + re.escape(REFLECT_CLOSE))
SAFE = SafetyLabel(safe=True, category=None, score=0.0)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans that tile ``text``: each ends after [.!?]+ and the whitespace after it."""
    cuts = [0] + [m.end() for m in re.finditer(r"[.!?]+\s+", text)] + [len(text)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def classify(doc_id: str, text: str, unsafe_spans: list[tuple[int, int, float]]) -> ClassifiedDocument:
    """Sentence segments; a segment overlapping an unsafe span is unsafe (S10, the max score)."""
    segments, labels = [], []
    for i, (a, b) in enumerate(split_sentences(text)):
        segments.append(Segment(i, a, b, text[a:b], len(text[a:b].split())))
        scores = [s for (ua, ub, s) in unsafe_spans if ua < b and a < ub]
        labels.append(SafetyLabel(False, "S10", max(scores)) if scores else SAFE)
    return ClassifiedDocument(doc_id, text, tuple(segments), tuple(labels), {"source": "test"})


@pytest.fixture(scope="module")
def toxigen_docs(shared_data: Path) -> list[ClassifiedDocument]:
    rows = [json.loads(line) for line in
            (shared_data / "toxigen" / "toxigen_statements.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    docs = []
    for d in range(0, len(rows), 5):
        text, unsafe = "", []
        for row in rows[d:d + 5]:
            start = len(text)
            text += row["text"].strip() + ". "
            if row["label"] == "unsafe":
                unsafe.append((start, len(text), 0.5 + 0.05 * (row["n_prompts_containing"] % 10)))
        docs.append(classify(f"toxigen-{d // 5}", text.rstrip(), unsafe))
    return docs


@pytest.fixture(scope="module")
def shakespeare_docs(shared_data: Path) -> list[ClassifiedDocument]:
    speeches = (shared_data / "tinyshakespeare" / "input.txt").read_text().split("\n\n")[:400]
    return [classify(f"shakespeare-{i // 10}", "\n\n".join(speeches[i:i + 10]), [])
            for i in range(0, len(speeches), 10)]


def unsafe_segments(doc):
    return [(s, l) for s, l in zip(doc.segments, doc.labels) if not l.safe]


def test_fixture_data_is_mixed(toxigen_docs, shakespeare_docs):
    n_unsafe = sum(len(unsafe_segments(d)) for d in toxigen_docs)
    n_safe = sum(len(d.segments) for d in toxigen_docs) - n_unsafe
    assert n_unsafe > 300 and n_safe > 200
    assert all(not unsafe_segments(d) for d in shakespeare_docs)
    for doc in toxigen_docs + shakespeare_docs:
        assert "".join(s.text for s in doc.segments) == doc.text


# ------------------------------------------------------------------ reflect
def test_reflect_every_segment(toxigen_docs, shakespeare_docs):
    reflect = build_intervention("reflect")
    for doc in toxigen_docs + shakespeare_docs:
        [out] = reflect(doc)
        assert out.doc_id == doc.doc_id and out.meta["source"] == "test"
        assert _REFLECTION_RE.sub("", out.text) == doc.text
        assert len(_REFLECTION_RE.findall(out.text)) == len(doc.segments)
        spans, seg_spans = out.meta["reflection_spans"], out.meta["segment_spans"]
        assert len(spans) == len(seg_spans) == len(doc.segments)
        expected = ""
        for seg, label, (a, b), (sa, sb) in zip(doc.segments, doc.labels, spans, seg_spans):
            assert out.text[sa:sb] == seg.text and sb == a  # reflection right after its segment
            assert parse_reflection(out.text[a:b]) == (label.safe, label.category)
            expected += seg.text + out.text[a:b]
        assert out.text == expected  # exactly seg1 + refl1 + seg2 + refl2 + ...
        assert out.meta["reflection_labels"] == [
            {"safe": l.safe, "category": l.category} for l in doc.labels]


def test_reflect_without_category(toxigen_docs):
    reflect = build_intervention("reflect", include_category=False)
    for doc in toxigen_docs:
        [out] = reflect(doc)
        found = [parse_reflection(out.text[a:b]) for a, b in out.meta["reflection_spans"]]
        assert found == [(l.safe, None) for l in doc.labels]
        assert f"{REFLECT_OPEN}Unsafe{REFLECT_CLOSE}" in out.text or all(l.safe for l in doc.labels)
        assert _REFLECTION_RE.sub("", out.text) == doc.text


def test_reflect_document_end(toxigen_docs, shakespeare_docs):
    reflect = build_intervention("reflect", every_segment=False)
    for doc in toxigen_docs + shakespeare_docs:
        [out] = reflect(doc)
        [(a, b)] = out.meta["reflection_spans"]
        assert out.text[:a] == doc.text and b == len(out.text)
        is_safe = all(l.safe for l in doc.labels)
        assert parse_reflection(out.text[a:b]) == (is_safe, None if is_safe else "S10")
    # the category is that of the highest-scoring unsafe segment
    doc = next(d for d in toxigen_docs if len(unsafe_segments(d)) >= 2)
    first, second = [s.index for s, _ in unsafe_segments(doc)][:2]
    labels = list(doc.labels)
    labels[first] = SafetyLabel(False, "S1", 0.7)
    labels[second] = SafetyLabel(False, "S9", 0.99)
    doc = ClassifiedDocument(doc.doc_id, doc.text, doc.segments, tuple(labels))
    [out] = reflect(doc)
    assert out.text.endswith(f"{REFLECT_OPEN}Unsafe: S9{REFLECT_CLOSE}")


# ------------------------------------------------------------------ tag
def _tag_positions(tagged: str) -> list[int]:
    """Offsets in the untagged text where tags were inserted."""
    positions, removed = [], 0
    for m in re.finditer(re.escape(UNSAFE_TAG), tagged):
        positions.append(m.start() - removed)
        removed += len(UNSAFE_TAG)
    return positions


def test_tag_rate_placement_and_roundtrip(toxigen_docs, shakespeare_docs):
    p = 0.05
    tag = build_intervention("tag", p=p, seed=1)
    words = tags = 0
    for doc in toxigen_docs + shakespeare_docs:
        [out] = tag(doc)
        assert out.text.replace(UNSAFE_TAG, "") == doc.text
        positions = _tag_positions(out.text)
        assert out.meta["unsafe_tags"] == len(positions)
        unsafe = unsafe_segments(doc)
        for pos in positions:  # every tag is inside an unsafe segment, before a word
            assert any(s.start <= pos < s.end for s, _ in unsafe)
            assert re.match(r"\s*\S", doc.text[pos:])
        words += sum(len(s.text.split()) for s, _ in unsafe)
        tags += len(positions)
    sd = math.sqrt(words * p * (1 - p))
    assert words >= 5000
    assert abs(tags - p * words) <= 4 * sd, (tags, words)


def test_tag_seeded_and_order_independent(toxigen_docs):
    a = [build_intervention("tag", seed=7)(d)[0].text for d in toxigen_docs]
    b = [build_intervention("tag", seed=7)(d)[0].text for d in reversed(toxigen_docs)][::-1]
    c = [build_intervention("tag", seed=8)(d)[0].text for d in toxigen_docs]
    assert a == b
    assert a != c
    assert build_intervention("tag", p=0.0)(toxigen_docs[0])[0].text == toxigen_docs[0].text
    everything = build_intervention("tag", p=1.0)
    for doc in toxigen_docs[:20]:
        n_words = sum(len(s.text.split()) for s, _ in unsafe_segments(doc))
        assert everything(doc)[0].text.count(UNSAFE_TAG) == n_words


# ------------------------------------------------------------------ filter
def test_filter_segment_mode(toxigen_docs, shakespeare_docs):
    filt = build_intervention("filter", mode="segment")
    emptied = 0
    for doc in toxigen_docs + shakespeare_docs:
        safe_text = "".join(s.text for s, l in zip(doc.segments, doc.labels) if l.safe)
        out = filt(doc)
        if not safe_text.strip():
            assert out == []
            emptied += 1
            continue
        [out] = out
        assert out.text == safe_text and out.doc_id == doc.doc_id
        assert out.meta["filtered_segments"] == [s.index for s, _ in unsafe_segments(doc)]
    assert emptied > 0  # some all-unsafe documents exist and produce nothing


def test_filter_threshold(toxigen_docs):
    filt = build_intervention("filter", threshold=0.8)
    cut = 0
    for doc in toxigen_docs:
        keep = "".join(s.text for s, l in zip(doc.segments, doc.labels)
                       if l.safe or l.score < 0.8)
        out = filt(doc)
        assert [o.text for o in out] == ([keep] if keep.strip() else [])
        cut += sum(l.score >= 0.8 for _, l in unsafe_segments(doc))
    assert 0 < cut < sum(len(unsafe_segments(d)) for d in toxigen_docs)


def test_filter_document_mode(toxigen_docs, shakespeare_docs):
    filt = build_intervention("filter", mode="document")
    for doc in toxigen_docs + shakespeare_docs:
        out = filt(doc)
        if unsafe_segments(doc):
            assert out == []
        else:
            assert [o.text for o in out] == [doc.text]
    # with a threshold, documents whose unsafe segments all score below it survive
    high = build_intervention("filter", mode="document", threshold=0.9)
    kept = [d for d in toxigen_docs if high(d)]
    assert all(all(l.safe or l.score < 0.9 for l in d.labels) for d in kept)
    assert any(unsafe_segments(d) for d in kept)


# ------------------------------------------------------------------ rewrite / refusal
def test_rewrite(toxigen_docs, shakespeare_docs):
    rewrite = build_intervention("rewrite")
    for doc in toxigen_docs:
        [out] = rewrite(doc)
        unsafe = unsafe_segments(doc)
        assert out.meta["rewritten_segments"] == [s.index for s, _ in unsafe]
        for seg, label in zip(doc.segments, doc.labels):
            if label.safe:
                assert seg.text in out.text
            else:
                assert seg.text.strip() not in out.text
        assert out.text.count("Hate (S10)") == len(unsafe)
        assert out.text.count("withheld") == len(unsafe)
    for doc in shakespeare_docs:
        assert [o.text for o in rewrite(doc)] == [doc.text]


def test_rewrite_custom_rewriter(toxigen_docs):
    from megatron_srp.interventions import Rewrite, RewriteOptions

    class Upper:
        def rewrite(self, segment_text, label):
            return segment_text.upper()

        def describe(self):
            return {"name": "upper"}

    doc = next(d for d in toxigen_docs if unsafe_segments(d))
    [out] = Rewrite(RewriteOptions(), rewriter=Upper())(doc)
    seg, _ = unsafe_segments(doc)[0]
    assert seg.text.strip().upper() in out.text
    assert Rewrite(RewriteOptions(), rewriter=Upper()).describe()["rewriter"] == {"name": "upper"}


def test_refusal(toxigen_docs, shakespeare_docs):
    refusal = build_intervention("refusal")
    total = 0
    for doc in toxigen_docs:
        out = refusal(doc)
        strong = [(s, l) for s, l in unsafe_segments(doc) if l.score >= 0.9]
        assert [o.doc_id for o in out] == [f"{doc.doc_id}/refusal/{s.index}" for s, _ in strong]
        for o, (seg, _) in zip(out, strong):
            user, assistant = o.text.split("\n")
            words = seg.text.split()
            assert user.startswith("User: Explain the following: " + " ".join(words[:12]))
            assert user.endswith("...") == (len(words) > 12)
            assert assistant.startswith("Assistant: I can't help") and "hate (S10)" in assistant
            assert o.meta["source_doc_id"] == doc.doc_id and o.meta["refusal_category"] == "S10"
        total += len(out)
    assert total > 20
    assert all(refusal(d) == [] for d in shakespeare_docs)
    assert sum(len(build_intervention("refusal", min_score=0.5)(d)) for d in toxigen_docs) > total


def test_raw_is_identity(toxigen_docs):
    raw = build_intervention("raw")
    for doc in toxigen_docs[:20]:
        [out] = raw(doc)
        assert (out.doc_id, out.text) == (doc.doc_id, doc.text)


# ------------------------------------------------------------------ registry and contracts
def test_registry_names_and_describe(toxigen_docs):
    assert set(INTERVENTIONS) == {"raw", "reflect", "filter", "tag", "rewrite", "refusal"}
    for name in INTERVENTIONS:
        stage = build_intervention(name)
        desc = stage.describe()
        assert desc["name"] == name == stage.name
        json.dumps(desc)
        clone = pickle.loads(pickle.dumps(stage))
        assert [o.text for o in clone(toxigen_docs[3])] == [o.text for o in stage(toxigen_docs[3])]
    assert build_intervention("tag", p=0.1, seed=3).describe() == {"name": "tag", "p": 0.1, "seed": 3}


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="unknown intervention 'nope'.*raw.*reflect.*filter.*tag"):
        build_intervention("nope")


@pytest.mark.parametrize("name, options, option", [
    ("tag", {"p": 1.5}, "p"),
    ("tag", {"p": "0.1"}, "p"),
    ("tag", {"seed": -1}, "seed"),
    ("filter", {"mode": "paragraph"}, "mode"),
    ("filter", {"threshold": -0.1}, "threshold"),
    ("reflect", {"every_segment": "yes"}, "every_segment"),
    ("reflect", {"include_category": 1}, "include_category"),
    ("refusal", {"min_score": 2}, "min_score"),
    ("refusal", {"request_words": 0}, "request_words"),
    ("rewrite", {"rewriter": "gpt"}, "rewriter"),
    ("tag", {"probability": 0.1}, "probability"),
])
def test_registry_bad_options(name, options, option):
    with pytest.raises(ValueError, match=f"'{option}'"):
        build_intervention(name, **options)


def test_segments_must_match_text(toxigen_docs):
    doc = toxigen_docs[0]
    seg = doc.segments[0]
    bad = ClassifiedDocument(doc.doc_id, doc.text,
                             (Segment(0, seg.start, seg.end, seg.text + "x", 1),), doc.labels[:1])
    for name in INTERVENTIONS:
        with pytest.raises(ValueError, match="toxigen-0"):
            build_intervention(name)(bad)
