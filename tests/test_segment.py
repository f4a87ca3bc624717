"""Segmentation: exact coverage, token budgets, sentence-end cuts, the pipeline stage."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import pytest

from megatron_srp.data.readers import read_text
from megatron_srp.documents import Document, Stage, apply_stages, describe_stages
from megatron_srp.reflection.segment import (
    SegmentConfig,
    SegmentStage,
    get_splitter,
    segment_text,
)
from megatron_srp.reflection.types import Segment
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

def _have_blingfire() -> bool:
    try:
        get_splitter("blingfire")
    except ImportError:
        return False
    return True


SPLITTER_NAMES = ["regex"] + (["blingfire"] if _have_blingfire() else [])


@pytest.fixture(scope="module")
def tok() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


@pytest.fixture(scope="module")
def wiki_docs(shared_data: Path) -> list[str]:
    docs = read_text(shared_data / "wikitext2" / "test.txt", text_split="wikitext-articles")
    return [d.text for d, _ in zip(docs, range(12))]


@pytest.fixture(scope="module")
def shakespeare(shared_data: Path) -> str:
    return (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:300_000]


def _check_cover(text: str, segments: list[Segment]) -> None:
    assert "".join(s.text for s in segments) == text
    pos = 0
    for k, s in enumerate(segments):
        assert s.index == k and s.start == pos and s.text == text[s.start : s.end]
        assert s.end > s.start
        pos = s.end
    assert pos == len(text)


def _check_token_boundaries(text: str, segments: list[Segment], tok: SRPTokenizer) -> None:
    offsets = tok._tokenizer.encode(text, add_special_tokens=False).offsets
    starts = {s for s, _ in offsets}
    assert sum(s.num_tokens for s in segments) == len(offsets)
    i = 0
    for s in segments:
        assert s.end == len(text) or s.end in starts  # a cut is where a token starts
        covered = 0
        while i < len(offsets) and offsets[i][0] < s.end:
            assert offsets[i][1] <= s.end, f"token {offsets[i]} straddles cut {s.end}"
            covered += 1
            i += 1
        assert covered == s.num_tokens


def _at_sentence_end(seg: Segment) -> bool:
    return seg.text.endswith("\n") or seg.text.rstrip(" \t").endswith(
        (".", "?", "!", '"', "'", ")", "]")
    )


@pytest.mark.parametrize("splitter", SPLITTER_NAMES)
def test_wikitext_segments(wiki_docs, tok, splitter):
    cfg = SegmentConfig(splitter=splitter)
    cuts = at_sentence = 0
    for text in wiki_docs:
        segments = segment_text(text, tok, cfg)
        _check_cover(text, segments)
        _check_token_boundaries(text, segments, tok)
        for s in segments[:-1]:
            assert cfg.min_tokens <= s.num_tokens <= cfg.max_tokens
            cuts += 1
            at_sentence += _at_sentence_end(s)
        assert segments[-1].num_tokens <= cfg.max_tokens
    assert cuts > 100
    assert at_sentence / cuts > 0.95


@pytest.mark.parametrize("splitter", SPLITTER_NAMES)
def test_shakespeare_segments(shakespeare, tok, splitter):
    cfg = SegmentConfig(segment_tokens=200, splitter=splitter)
    segments = segment_text(shakespeare, tok, cfg)
    _check_cover(shakespeare, segments)
    _check_token_boundaries(shakespeare, segments, tok)
    assert len(segments) > 100
    assert all(cfg.min_tokens <= s.num_tokens <= cfg.max_tokens for s in segments[:-1])
    assert sum(_at_sentence_end(s) for s in segments[:-1]) / (len(segments) - 1) > 0.95
    # paragraphs as documents (mostly shorter than one segment)
    for doc in list(read_text_blocks(shakespeare))[:300]:
        segs = segment_text(doc, tok, cfg)
        _check_cover(doc, segs)


def read_text_blocks(text: str):
    return (block for block in text.split("\n\n") if block)


def test_huge_sentence_cut_at_token_boundaries(tok):
    words = ["alpha", "beta", "gamma", "délta", "日本語", "epsilon", "zeta"]
    text = " ".join(words[i % len(words)] + str(i % 13) for i in range(3000))
    cfg = SegmentConfig(segment_tokens=100, splitter="regex")
    segments = segment_text(text, tok, cfg)
    _check_cover(text, segments)
    _check_token_boundaries(text, segments, tok)
    assert len(segments) > 10
    assert all(s.num_tokens <= cfg.max_tokens for s in segments)
    assert all(cfg.min_tokens <= s.num_tokens for s in segments[:-1])
    # with no sentence ends, cuts fall before words, not inside them
    assert all(text[s.start].isspace() or text[s.start - 1].isspace() for s in segments[1:])


def test_no_whitespace_multibyte_never_split_inside_a_character(tok):
    text = "日本語の文章" * 400  # no spaces, no punctuation, multi-byte characters
    cfg = SegmentConfig(segment_tokens=64, splitter="regex")
    segments = segment_text(text, tok, cfg)
    _check_cover(text, segments)
    _check_token_boundaries(text, segments, tok)
    assert len(segments) > 5 and all(s.num_tokens <= cfg.max_tokens for s in segments)


def test_empty_and_short(tok):
    assert segment_text("", tok, SegmentConfig(splitter="regex")) == []
    text = "  A short text. Only two sentences!\n"
    (seg,) = segment_text(text, tok, SegmentConfig(splitter="regex"))
    assert seg == Segment(0, 0, len(text), text, len(tok.tokenize(text)))
    (ws,) = segment_text(" \n ", tok, SegmentConfig(splitter="regex"))
    assert ws.text == " \n "


def test_short_tail_is_merged(tok):
    # 20 sentences of ~10 tokens; budget 100, max 150: the tail is never a tiny stub
    text = " ".join(f"Sentence number {i} is here and short." for i in range(23))
    cfg = SegmentConfig(segment_tokens=100, splitter="regex")
    segments = segment_text(text, tok, cfg)
    _check_cover(text, segments)
    assert all(cfg.min_tokens <= s.num_tokens <= cfg.max_tokens for s in segments)


def test_deterministic(wiki_docs, tok):
    cfg = SegmentConfig(segment_tokens=128, splitter=SPLITTER_NAMES[-1])
    assert segment_text(wiki_docs[0], tok, cfg) == segment_text(wiki_docs[0], tok, cfg)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"segment_tokens": 0}, "segment_tokens"),
        ({"segment_tokens": 12.5}, "segment_tokens"),
        ({"segment_tokens": True}, "segment_tokens"),
        ({"min_fraction": 0}, "min_fraction"),
        ({"min_fraction": 1.2}, "min_fraction"),
        ({"min_fraction": float("nan")}, "min_fraction"),
        ({"max_fraction": 0.9}, "max_fraction"),
        ({"max_fraction": float("inf")}, "max_fraction"),
        ({"max_fraction": "2"}, "max_fraction"),
        ({"splitter": "nltk"}, "splitter"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SegmentConfig(**kwargs)


def test_config_bounds():
    cfg = SegmentConfig()
    assert (cfg.segment_tokens, cfg.min_tokens, cfg.max_tokens) == (256, 128, 384)
    assert SegmentConfig(segment_tokens=1).min_tokens == 1


def _run_stage(stage_bytes: bytes, doc: Document) -> tuple[list, dict]:
    stage = pickle.loads(stage_bytes)
    (out,) = list(stage(doc))
    return out.meta["segments"], stage.describe()


def test_stage_pickles_and_runs_in_spawn_worker(wiki_docs, tok):
    cfg = SegmentConfig(segment_tokens=128, splitter=SPLITTER_NAMES[-1])
    stage = SegmentStage(cfg)
    assert isinstance(stage, Stage)
    doc = Document("wiki-0", wiki_docs[0], meta={"source": "wikitext2"})
    (local,) = apply_stages(doc, [stage])  # loads the tokenizer...
    assert doc.meta == {"source": "wikitext2"}  # input not mutated
    assert local.meta["source"] == "wikitext2"
    assert local.meta["segments"] == segment_text(doc.text, tok, cfg)
    blob = pickle.dumps(stage)  # ...which is not pickled
    assert len(blob) < 2000
    description = describe_stages([stage])[0]
    assert description["splitter"] == cfg.splitter and description["segment_tokens"] == 128
    assert description["tokenizer_fingerprint"] == tok.fingerprint
    with mp.get_context("spawn").Pool(1) as pool:
        segments, remote_description = pool.apply(_run_stage, (blob, doc))
    assert segments == local.meta["segments"]
    assert remote_description == description


@pytest.mark.skipif(not _have_blingfire(), reason="blingfire is not installed")
def test_blingfire_spans_match_the_wrapper(wiki_docs, shakespeare):
    """Our ctypes call (numpy offset mapping, reused buffers) gives blingfire's own spans, also
    for a short text after a long one and for multi-byte characters."""
    import blingfire

    splitter = get_splitter("blingfire")
    texts = [shakespeare[:200_000], "Short one. Two!", *wiki_docs,
             "Café au lait — naïve façade. Ça va? Ünïcödé ends here.", "Done."]
    for text in texts:
        assert splitter.sentence_spans(text) == blingfire.text_to_sentences_and_offsets(text)[1]


@pytest.mark.skipif(not _have_blingfire(), reason="blingfire is not installed")
def test_blingfire_sentence_ends_trim_trailing_whitespace(wiki_docs, shakespeare):
    """Sentence ends are blingfire's span ends moved back over whitespace: checked against a
    plain loop over blingfire's own spans, on ASCII and non-ASCII texts (the two paths)."""
    import blingfire

    def expected(text: str) -> list[int]:
        if not text.strip():
            return []
        ends = []
        for start, end in blingfire.text_to_sentences_and_offsets(text)[1]:
            if 0 <= start < end <= len(text):
                while end > start and text[end - 1].isspace():
                    end -= 1
                ends.append(end)
        return ends

    splitter = get_splitter("blingfire")
    texts = [shakespeare[:100_000], *wiki_docs, "Trailing tab.\t Next one\u3000 ends here.\u3000",
             "Café au lait — naïve façade.\u2003 Ça va?\u00a0 Ünïcödé ends here. ", " \n\t ", "",
             "An ASCII text that ends in tabs\t\t", "A line\t\x0bthen another. And more.\r\n"]
    for text in texts:
        assert splitter.sentence_ends(text) == expected(text), text[:80]
    assert any(expected(t) != [e for _, e in blingfire.text_to_sentences_and_offsets(t)[1]]
               for t in texts if t.strip())  # some span really ended in whitespace
