"""SRP preprocessing end to end on real text: variants, label sidecar, determinism, backends,
resume after a kill, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_srp.data.outputs import VOLATILE_META_KEYS, dataset_paths, read_dataset_meta
from megatron_srp.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megatron_srp.data.readers import InputError
from megatron_srp.data.shards import ReaderOptions
from megatron_srp.data.variants import VariantSpec, parse_variants
from megatron_srp.interventions.rewrite import TemplateRewriter
from megatron_srp.reflection.types import SafetyLabel
from megatron_srp.taxonomy import REFLECT_CLOSE, REFLECT_OPEN, UNSAFE_TAG, format_reflection
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = "raw,filter,rewrite,tag,srp,refusal"


@pytest.fixture(scope="module")
def tok() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


@pytest.fixture(scope="module")
def corpus(shared_data: Path) -> list[str]:
    """Long Wikipedia articles (several segments each) and short ToxiGen statements."""
    return [str(shared_data / "wikitext2" / "valid.txt"),
            str(shared_data / "toxigen" / "toxigen_statements.jsonl")]


def _config(inputs, out: Path, variants=VARIANTS, **kw) -> PreprocessConfig:
    reader = kw.pop("reader", ReaderOptions(text_split="wikitext-articles"))
    return PreprocessConfig(inputs=list(inputs), output_dir=str(out),
                            variants=parse_variants(variants) if isinstance(variants, str)
                            else variants, reader=reader, progress=False, **kw)


@pytest.fixture(scope="module")
def run(corpus, tok, tmp_path_factory):
    """One run, several shards, all variants, tag probability high enough to count."""
    out = tmp_path_factory.mktemp("srp") / "out"
    variants = parse_variants(VARIANTS.replace("tag", "tag:p=0.2"))
    return run_preprocess(_config(corpus, out, variants, shard_bytes=300_000), tok)


def _docs(prefix: Path) -> list[np.ndarray]:
    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]


def _labels(prefix: Path) -> list[dict]:
    return [json.loads(line) for line in dataset_paths(prefix)["labels"].read_text().splitlines()]


def _by_doc(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["doc_id"], []).append(r)
    return out


def test_summary_and_meta(run) -> None:
    s = run.summary
    assert s["shards"] >= 4 and s["rejected"] == 0
    assert s["documents_read"] == 60 + 722
    assert 0 < s["unsafe_segments"] < s["segments"]
    assert sum(s["categories"].values()) == s["unsafe_segments"]
    assert set(s["variants"]) == set(VARIANTS.split(","))
    assert s["variants"]["raw"]["added_tokens_per_100_input"] == 0.0  # segments cut on tokens
    assert s["variants"]["srp"]["added_tokens_per_100_input"] > 0
    for name, prefix in run.layout.prefixes.items():
        meta = read_dataset_meta(prefix)
        assert meta["variant"] == name and meta["counts"]["segments"] == s["segments"]
        assert [st["name"] for st in meta["stages"]] == ["strip_special_tokens", "segment",
                                                         "classify"]
        assert meta["classifier"]["name"] == "embedded"
        assert len(_docs(prefix)) == meta["counts"]["documents"]
    assert read_dataset_meta(run.layout.prefixes["srp"])["intervention"]["name"] == "reflect"
    assert "| srp | reflect |" in run.layout.summary_md.read_text()


def test_srp_reflection_exactly_after_each_segment(run, tok) -> None:
    raw = _docs(run.layout.prefixes["raw"])
    srp = _docs(run.layout.prefixes["srp"])
    assert len(raw) == len(srp)
    records = _by_doc(_labels(run.layout.prefixes["srp"]))
    reflection = re.compile(re.escape(REFLECT_OPEN) + ".*?" + re.escape(REFLECT_CLOSE))
    checked = 0
    for segments in records.values():
        n = segments[0]["dataset_doc"]
        ids = srp[n][:-1].tolist()
        text = tok.detokenize(ids)
        assert reflection.sub("", text) == tok.detokenize(raw[n][:-1])  # nothing else changed
        without = [t for t, keep in zip(ids, _outside_reflections(ids, tok)) if keep]
        assert without == raw[n][:-1].tolist()  # the segments are the raw tokens, exactly
        assert text.count(REFLECT_OPEN) == len(segments)
        cursor = 0
        for r in segments:
            start, end = r["tokens"]
            assert start == cursor  # the segment follows the previous reflection directly
            closing = ids.index(tok.reflect_close_id, end)
            assert ids[end] == tok.reflect_open_id
            expected = format_reflection(r["label"] == "safe", r["category"])
            assert tok.detokenize(ids[end:closing + 1]) == expected
            cursor = closing + 1
            checked += 1
        assert cursor == len(ids)
    assert checked == run.summary["segments"]


def _outside_reflections(ids: list[int], tok) -> list[bool]:
    """Per token: False inside a reflection (opener to closer, both included)."""
    keep, inside = [], False
    for t in ids:
        if t == tok.reflect_open_id:
            inside = True
        keep.append(not inside)
        if t == tok.reflect_close_id:
            inside = False
    return keep


def test_sidecar_spans_give_back_the_segments(run, tok) -> None:
    raw = _docs(run.layout.prefixes["raw"])
    records = _labels(run.layout.prefixes["raw"])
    assert len(records) == run.summary["segments"]
    long_docs = 0
    for segments in _by_doc(records).values():
        ids = raw[segments[0]["dataset_doc"]][:-1]
        assert [r["tokens"] for r in segments] == [r["source_tokens"] for r in segments]
        assert segments[-1]["tokens"][1] == len(ids)
        full = tok.detokenize(ids)
        for r in segments:
            a, b = r["chars"]
            assert tok.detokenize(ids[r["tokens"][0]:r["tokens"][1]]) == full[a:b]
        long_docs += len(segments) > 1
    assert long_docs >= 50  # the articles span several segments


def test_tag_rate_and_no_tags_in_safe_segments(run, tok) -> None:
    tagged = _docs(run.layout.prefixes["tag"])
    words = tags = 0
    raw_text = {}
    for segments in _by_doc(_labels(run.layout.prefixes["raw"])).values():
        for r in segments:
            raw_text[(r["doc_id"], r["segment"])] = r
    for r in _labels(run.layout.prefixes["tag"]):
        ids = tagged[r["dataset_doc"]][r["tokens"][0]:r["tokens"][1]].tolist()
        n_tags = ids.count(tok.unsafe_tag_id)
        if r["label"] == "safe":
            assert n_tags == 0
        else:
            text = tok.detokenize(ids).replace(UNSAFE_TAG, "")
            words += len(text.split())
            tags += n_tags
    p = 0.2
    assert words > 2000
    bound = 4 * math.sqrt(words * p * (1 - p))  # a 4-sigma binomial bound
    assert abs(tags - p * words) < bound, (tags, words)


def test_filter_rewrite_refusal_contents(run, tok) -> None:
    records = _labels(run.layout.prefixes["raw"])
    raw = _docs(run.layout.prefixes["raw"])
    unsafe = [r for r in records if r["label"] == "unsafe"]
    filtered = {json.dumps(r["doc_id"]): r for r in _labels(run.layout.prefixes["filter"])}
    assert all(filtered[json.dumps(r["doc_id"])]["dataset_doc"] is None
               or r["label"] == "safe" or filtered[json.dumps(r["doc_id"])]["tokens"] is not None
               for r in records)
    filter_docs = _docs(run.layout.prefixes["filter"])
    for r in _labels(run.layout.prefixes["filter"]):
        if r["label"] == "unsafe":
            assert r["tokens"] is None  # deleted
        elif r["dataset_doc"] is not None:
            source = raw_segment(raw, records, r, tok)
            assert tok.detokenize(filter_docs[r["dataset_doc"]][r["tokens"][0]:r["tokens"][1]]
                                  ) == source
    rewrite_docs = _docs(run.layout.prefixes["rewrite"])
    for r in _labels(run.layout.prefixes["rewrite"]):
        if r["label"] == "unsafe":
            assert r["tokens"] is None  # replaced
        else:
            ids = rewrite_docs[r["dataset_doc"]][r["tokens"][0]:r["tokens"][1]]
            assert tok.detokenize(ids) == raw_segment(raw, records, r, tok)
    rewrite_text = "".join(tok.detokenize(d[:-1]) for d in _docs(run.layout.prefixes["rewrite"]))
    notices = TemplateRewriter().rewrite("x", SafetyLabel(False, "S10", 1.0))
    assert rewrite_text.count(notices) == sum(r["category"] == "S10" for r in unsafe)
    refusals = [tok.detokenize(d[:-1]) for d in _docs(run.layout.prefixes["refusal"])]
    assert len(refusals) == sum(r["score"] >= 0.9 for r in unsafe) > 0
    assert all(t.startswith("User: ") and "\nAssistant: I can't help with that." in t
               for t in refusals)


def raw_segment(raw, records, r, tok) -> str:
    source = next(x for x in records if x["doc_id"] == r["doc_id"] and x["segment"] == r["segment"])
    ids = raw[source["dataset_doc"]]
    return tok.detokenize(ids[source["tokens"][0]:source["tokens"][1]])


def _identical(a, b, variants) -> None:
    for name in variants:
        pa, pb = dataset_paths(a.layout.prefixes[name]), dataset_paths(b.layout.prefixes[name])
        for key in ("bin", "idx", "labels"):
            assert pa[key].read_bytes() == pb[key].read_bytes(), (name, key)
        ma, mb = (json.loads(p["meta"].read_text()) for p in (pa, pb))
        for key in VOLATILE_META_KEYS:
            ma.pop(key), mb.pop(key)
        assert ma == mb


def test_same_input_same_bytes_any_worker_count(corpus, tok, tmp_path) -> None:
    variants = "raw,tag,srp"
    one = run_preprocess(_config(corpus, tmp_path / "a", variants, shard_bytes=300_000), tok)
    two = run_preprocess(_config(corpus, tmp_path / "b", variants, shard_bytes=300_000,
                                 workers=2), tok)
    _identical(one, two, variants.split(","))
    other_seed = run_preprocess(_config(corpus, tmp_path / "c", "tag:seed=1",
                                        shard_bytes=300_000), tok)
    assert (dataset_paths(other_seed.layout.prefixes["tag"])["bin"].read_bytes()
            != dataset_paths(one.layout.prefixes["tag"])["bin"].read_bytes())


def test_ray_backend_gives_identical_datasets(corpus, tok, tmp_path) -> None:
    pytest.importorskip("ray.data")
    variants = "raw,srp,refusal"
    local = run_preprocess(_config(corpus, tmp_path / "local", variants, shard_bytes=300_000),
                           tok)
    on_ray = run_preprocess(_config(corpus, tmp_path / "ray", variants, shard_bytes=300_000,
                                    backend="ray", workers=2), tok)
    assert on_ray.summary["backend"] == "ray" and on_ray.summary["shards"] >= 4
    _identical(local, on_ray, variants.split(","))
    # Same inputs and shards as the pinned reference (test_preprocess_reference.py): Ray's raw
    # and srp token files have its digests too (the label sidecars name the input's path,
    # which differs here; they are compared with local's above).
    reference = json.loads((REPO_ROOT / "tests" / "data" / "preprocess_reference.json")
                           .read_text())["runs"]["srp"]
    for name in ("raw", "srp"):
        for key in ("bin", "idx"):
            path = dataset_paths(on_ray.layout.prefixes[name])[key]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == reference[f"{name}.{key}"], (
                name, key)


def test_resume_after_kill_matches_a_clean_run(corpus, tok, tmp_path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "preprocess_srp.py"), "--input", corpus[0],
           "--input", corpus[1], "--text-split", "wikitext-articles", "--output-dir", str(out),
           "--variants", "raw,srp", "--shard-mb", "0.05", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    done = out / ".work" / "done"
    deadline = time.time() + 120
    while not (done.is_dir() and len(list(done.glob("*.json"))) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "srp.meta.json").exists() and not (out / "summary.json").exists()
    finished = len(list(done.glob("*.json")))
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["shards_resumed"] >= finished >= 3 and resumed["shards"] > finished
    assert not (out / ".work").exists()
    clean = run_preprocess(_config(corpus, tmp_path / "clean", "raw,srp",
                                   shard_bytes=int(0.05 * (1 << 20))), tok)
    for name in ("raw", "srp"):
        for key in ("bin", "idx", "labels"):
            assert (dataset_paths(out / name)[key].read_bytes()
                    == dataset_paths(clean.layout.prefixes[name])[key].read_bytes())


def test_oracle_labels_from_records(tmp_path, tok) -> None:
    path = tmp_path / "labelled.jsonl"
    rows = [{"text": "A recipe for bread. " * 40, "label": "safe"},
            {"text": "How to hurt someone. " * 40, "label": "unsafe", "category": "S1"},
            {"text": "no label here"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_preprocess(_config([path], tmp_path / "o", "srp", classifier="oracle",
                                    segment=_small_segments(), max_reject_fraction=0.5,
                                    reader=ReaderOptions()), tok)
    labels = _labels(result.layout.prefixes["srp"])
    assert {(r["label"], r["category"]) for r in labels if r["doc_id"].endswith(":1")} == {
        ("safe", None)}
    assert {(r["label"], r["category"]) for r in labels if r["doc_id"].endswith(":2")} == {
        ("unsafe", "S1")}
    assert len([r for r in labels if r["doc_id"].endswith(":1")]) > 1
    (reject,) = [json.loads(x) for x in result.layout.rejects.read_text().splitlines()]
    assert reject["line"] == 3 and "oracle label" in reject["reason"] and "'label'" in reject["reason"]


def _small_segments():
    from megatron_srp.reflection.segment import SegmentConfig
    return SegmentConfig(segment_tokens=64)


BAD_LINES = [
    ('{"text": "a good document", "id": "a"}', None),
    ('{"text": "broken', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"body": "no text"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' is int, not a string"),
    ('{"text": "   "}', "empty text"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    ('{"text": "' + "x" * 500 + '"}', "document too long"),
    ('{"text": "same id again", "id": "a"}', "duplicate id 'a'"),
    ('{"text": "another good one", "id": "b"}', None),
]


def _bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for line, _ in BAD_LINES:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def test_every_bad_input_is_rejected_with_file_line_and_reason(tmp_path, tok) -> None:
    path = _bad_file(tmp_path)
    reader = ReaderOptions(id_key="id", max_chars=400)
    result = run_preprocess(_config([path], tmp_path / "out", "raw", reader=reader,
                                    max_reject_fraction=1.0), tok)
    rejects = [json.loads(x) for x in result.layout.rejects.read_text().splitlines()]
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_LINES) if reason]
    assert [(r["line"], r["file"]) for r in rejects] == [(n, str(path)) for n, _ in expected]
    for r, (_, reason) in zip(rejects, expected):
        assert r["reason"].startswith(reason), (r, reason)
    assert result.summary["rejected"] == len(expected) == 8
    assert sum(result.summary["reject_reasons"].values()) == 8
    texts = [tok.detokenize(d[:-1]) for d in _docs(result.layout.prefixes["raw"])]
    assert texts == ["a good document", "another good one"]


def test_strict_stops_at_the_first_bad_record(tmp_path, tok) -> None:
    path = _bad_file(tmp_path)
    with pytest.raises(InputError, match=rf"{path}:2: invalid JSON"):
        run_preprocess(_config([path], tmp_path / "out", "raw", strict=True,
                               reader=ReaderOptions()), tok)
    assert not (tmp_path / "out" / "raw.meta.json").exists()


def test_too_many_rejects_fail_clearly_and_publish_nothing(tmp_path, tok) -> None:
    path = _bad_file(tmp_path)
    with pytest.raises(PreprocessError, match=r"8 of 10 input records were rejected .*"
                                              r"max_reject_fraction 50\.00%.*First: .*bad.jsonl:2"):
        run_preprocess(_config([path], tmp_path / "out", "raw", max_reject_fraction=0.5,
                               reader=ReaderOptions(id_key="id", max_chars=400)), tok)
    assert not (tmp_path / "out" / "raw.meta.json").exists()
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 8


def test_duplicate_ids_across_shards_and_parquet(tmp_path, tok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"id": i, "text": f"document {i} " * 30}) + "\n"
                         for i in range(40)))
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["39", "40"], "text": ["dup of 39", "new"]}), b)
    result = run_preprocess(_config([a, b], tmp_path / "out", "raw", shard_bytes=500,
                                    reader=ReaderOptions(id_key="id"), max_reject_fraction=0.1),
                            tok)
    assert result.summary["shards"] > 3
    (reject,) = [json.loads(x) for x in result.layout.rejects.read_text().splitlines()]
    assert reject["row"] == 0 and reject["reason"] == f"duplicate id '39' (first seen at {a}:40)"
    assert result.summary["documents_read"] == 41


def test_variant_specs_and_config_errors(tmp_path, tok, corpus) -> None:
    spec = VariantSpec.parse("srp-end=reflect:every_segment=false,include_category=false")
    assert (spec.name, spec.intervention_name, spec.options) == (
        "srp-end", "reflect", {"every_segment": False, "include_category": False})
    with pytest.raises(ValueError, match="unknown intervention 'shout'"):
        VariantSpec.parse("shout")
    with pytest.raises(ValueError, match="option 'q' is not key=value"):
        VariantSpec.parse("tag:q")
    with pytest.raises(ValueError, match=r"variant 'tag': .*option 'p' must be in"):
        run_preprocess(_config(corpus, tmp_path / "x", "tag:p=2"), tok)
    with pytest.raises(ValueError, match="unique"):
        _config(corpus, tmp_path / "x", "raw,raw")
    with pytest.raises(ValueError, match="exactly one of output_dir and output_prefix"):
        PreprocessConfig(inputs=corpus)


def test_cli_variants(tmp_path, shared_data, capsys) -> None:
    import runpy

    tool = runpy.run_path(str(REPO_ROOT / "tools" / "preprocess_srp.py"))
    argv = ["--input", str(shared_data / "toxigen" / "toxigen_statements.jsonl"),
            "--output-dir", str(tmp_path / "cli"), "--variants", "raw,srp",
            "--variant", "srp-end=reflect:every_segment=false", "--workers", "1"]
    assert tool["main"](argv) == 0
    out = capsys.readouterr().out
    assert "| srp-end | reflect | 722 |" in out and "722 documents in" in out
    end = read_dataset_meta(tmp_path / "cli" / "srp-end")
    assert end["intervention"]["every_segment"] is False
    assert tool["main"](argv) == 2 and "output exists" in capsys.readouterr().err
    assert tool["main"](argv[:-4] + ["--variants", "nope", "--overwrite"]) == 2
    assert "unknown intervention 'nope'" in capsys.readouterr().err


def test_sidecar_lines_are_json_dumps_of_each_record():
    """The sidecar is formatted by hand for speed; it must stay ``json.dumps`` byte for byte,
    for awkward ids, missing numbers and spans, unparsed labels and non-finite scores."""
    from megatron_srp.data.shard_worker import _sidecar_lines
    from megatron_srp.reflection.types import ClassifiedDocument, Segment

    text = "Héllo \"wörld\"\n\tmore text here"
    segments = (Segment(0, 0, 6, text[:6], 3), Segment(1, 6, 14, text[6:14], 4),
                Segment(2, 14, len(text), text[14:], 5))
    labels = (SafetyLabel(True, None, 0.1234567891), SafetyLabel(False, "S10", 1.0),
              SafetyLabel(True, None, float("nan"), unparsed=True))
    for doc_id in ('doc "7"\\é\u2028', "plain-3", "tab\there"):
        doc = ClassifiedDocument(doc_id, text, segments, labels)
        placed = {0: (5, [0, 3]), 2: (9, None)}
        expected, cursor = [], 0
        for seg, label in zip(segments, labels):
            number, tokens = placed.get(seg.index, (None, None))
            expected.append(json.dumps({
                "doc_id": doc_id, "segment": seg.index, "chars": [seg.start, seg.end],
                "source_tokens": [cursor, cursor + seg.num_tokens],
                "label": "safe" if label.safe else "unsafe", "category": label.category,
                "score": round(float(label.score), 6), "dataset_doc": number, "tokens": tokens,
                **({"unparsed": True} if label.unparsed else {})}, ensure_ascii=False) + "\n")
            cursor += seg.num_tokens
        assert _sidecar_lines(doc, placed) == "".join(expected)


def test_merged_sidecar_shifts_only_dataset_doc(tmp_path):
    """Merging rewrites ``dataset_doc`` in place of a parse and re-dump; a document id that
    spells the key itself must not be touched."""
    import io

    from megatron_srp.data.outputs import _append_labels

    records = [{"doc_id": doc_id, "segment": 0, "chars": [0, 5], "source_tokens": [0, 2],
                "label": "safe", "category": None, "score": 0.25, "dataset_doc": number,
                "tokens": [0, 2]}
               for doc_id, number in (('a", "dataset_doc": 3, "b', 0), ("plain", None),
                                      ("ünï\u2028", 41), (', "dataset_doc": 7,', 2))]
    shard = tmp_path / "shard.labels.jsonl"
    shard.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                     encoding="utf-8")
    out = io.StringIO()
    _append_labels(shard, 100, out)
    expected = [{**r, "dataset_doc": None if r["dataset_doc"] is None else r["dataset_doc"] + 100}
                for r in records]
    assert out.getvalue() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in expected)
