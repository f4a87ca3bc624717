"""Preprocessing: readers, stages, the indexed dataset on disk, and failure behaviour."""

from __future__ import annotations

import dataclasses
import json
import runpy
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_srp.data.preprocess import dataset_paths, preprocess, read_dataset_meta
from megatron_srp.data.readers import InputError, expand_inputs, read_documents
from megatron_srp.documents import Document, StageError, StripSpecialTokens
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class ExplodeOn:
    """Fails on the first document at or after ``line``: a crash in the middle of a run."""

    line: int
    name = "explode_on"

    def __call__(self, doc: Document) -> Iterator[Document]:
        if doc.meta["line"] >= self.line:
            raise RuntimeError("boom")
        yield doc

    def describe(self) -> dict:
        return {"name": self.name, "line": self.line}


@dataclasses.dataclass(frozen=True)
class SplitSpeakers:
    """Drops documents spoken by 'All', splits the rest into speaker and speech."""

    name = "split_speakers"

    def __call__(self, doc: Document) -> Iterator[Document]:
        speaker, _, speech = doc.text.partition("\n")
        if speaker != "All:":
            yield Document(doc.doc_id + "#0", speaker, doc.meta)
            yield Document(doc.doc_id + "#1", speech, doc.meta)

    def describe(self) -> dict:
        return {"name": self.name}


@pytest.fixture(scope="module")
def tok() -> SRPTokenizer:
    return SRPTokenizer.from_dir(default_tokenizer_dir())


@pytest.fixture
def shakespeare(tmp_path: Path, shared_data: Path) -> Path:
    """The first 400 lines of tinyshakespeare (about 90 speeches)."""
    lines = (shared_data / "tinyshakespeare" / "input.txt").read_text().splitlines(keepends=True)
    path = tmp_path / "in" / "shakespeare.txt"
    path.parent.mkdir()
    path.write_text("".join(lines[:400]))
    return path


def _sequences(prefix: Path) -> list[np.ndarray]:
    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the views die with the mmap


def _assert_dataset_matches(prefix: Path, docs: list[str], tok: SRPTokenizer) -> None:
    seqs = _sequences(prefix)
    assert len(seqs) == len(docs)
    for seq, text in zip(seqs, docs):
        assert seq[-1] == tok.eod and tok.eod not in seq[:-1]
        assert tok.detokenize(seq[:-1]) == text


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("out"))


def test_shakespeare_round_trip(tmp_path: Path, shakespeare: Path, tok: SRPTokenizer) -> None:
    prefix = tmp_path / "out" / "shakespeare"
    result = preprocess([shakespeare], prefix, tok, progress=False)
    docs = [d.text for d in read_documents([shakespeare])]
    assert len(docs) > 50
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    _assert_dataset_matches(prefix, docs, tok)
    assert IndexedDataset(str(prefix)).index.dtype == np.uint16

    meta = read_dataset_meta(prefix, expected_fingerprint=tok.fingerprint)
    assert meta == result.meta
    assert meta["counts"] == {
        "input_documents": len(docs),
        "rejected": 0,
        "empty_documents_dropped": 0,
        "documents": len(docs),
        "tokens": sum(len(s) for s in _sequences(prefix)),
        "documents_without_output": 0,
        "segments": 0,
        "unsafe_segments": 0,
        "unparsed_labels": 0,
        "segments_placed": 0,
    }
    assert meta["variant"] == "raw" and meta["intervention"] == {"name": "raw"}
    assert meta["classifier"] is None and meta["files"]["labels"] is None
    assert meta["tokenizer"]["eod"] == tok.eod and meta["dtype"] == "uint16"
    assert meta["inputs"] == [{"path": str(shakespeare.resolve()), "format": "text",
                               "bytes": shakespeare.stat().st_size}]
    assert [s["name"] for s in meta["stages"]] == ["strip_special_tokens"]
    saved = SRPTokenizer.from_dir(result.paths["tokenizer"])
    assert saved.fingerprint == tok.fingerprint
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "shakespeare.bin", "shakespeare.idx", "shakespeare.meta.json", "shakespeare.rejects.jsonl",
        "shakespeare.summary.json", "shakespeare.summary.md", "shakespeare.tokenizer"]
    assert (prefix.parent / "shakespeare.rejects.jsonl").read_text() == ""


def test_toxigen_jsonl(tmp_path: Path, shared_data: Path, tok: SRPTokenizer) -> None:
    source = shared_data / "toxigen" / "toxigen_statements.jsonl"
    prefix = tmp_path / "toxigen"
    result = preprocess([source], prefix, tok, progress=False)
    records = [json.loads(line) for line in source.read_text().splitlines()]
    assert result.documents_in == result.documents == len(records) == 722
    _assert_dataset_matches(prefix, [r["text"] for r in records], tok)
    first = next(read_documents([source]))
    assert first.meta["line"] == 1 and first.meta["fields"]["label"] == records[0]["label"]


def test_gpt_dataset_reads_output(tmp_path: Path, shakespeare: Path, tok: SRPTokenizer) -> None:
    prefix = tmp_path / "shakespeare"
    preprocess([shakespeare], prefix, tok, progress=False)
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=32, tokenizer=tok, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
    )
    assert config.token_dtype_code == 8
    indexed = IndexedDataset(str(prefix))
    dataset = GPTDataset(indexed, str(prefix), np.arange(len(indexed), dtype=np.int32), 10,
                         Split.train, config)
    assert tok.fingerprint in dataset.unique_description
    corpus = np.concatenate(_sequences(prefix)).tobytes()
    for i in range(len(dataset)):
        tokens = dataset[i]["tokens"].numpy().astype(np.uint16)
        assert tokens.shape == (32,)
        # Samples cross shuffled document boundaries; each piece between eods is a real span.
        pieces = np.split(tokens, np.flatnonzero(tokens == tok.eod) + 1)
        assert all(p[p != tok.eod].tobytes() in corpus for p in pieces)


def test_workers_give_identical_bytes(tmp_path: Path, shared_data: Path, tok: SRPTokenizer) -> None:
    inputs = [str(shared_data / "tinyshakespeare" / "input.txt"),
              str(shared_data / "toxigen" / "toxigen_statements.jsonl")]
    one = preprocess(inputs, tmp_path / "w1", tok, workers=1, progress=False)
    two = preprocess(inputs, tmp_path / "w2", tok, workers=2, progress=False)
    assert one.documents > 7000  # several chunks, so ordering across workers is exercised
    for key in ("bin", "idx"):
        assert one.paths[key].read_bytes() == two.paths[key].read_bytes()
    assert one.meta["config_hash"] == two.meta["config_hash"]


def test_wikitext_articles(shared_data: Path) -> None:
    source = shared_data / "wikitext2" / "valid.txt"
    docs = list(read_documents([source], text_split="wikitext-articles"))
    assert len(docs) == 60
    assert docs[0].meta["title"] == "Homarus gammarus"
    assert docs[0].text.startswith(" = Homarus gammarus = \n")
    assert " = = Description = = " in docs[0].text
    for doc in docs:
        lines = doc.text.split("\n")
        titles = [t for t in lines if t.startswith(" = ") and not t.startswith(" = = ")]
        assert titles == [f" = {doc.meta['title']} = "]


def test_text_splits(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\n\nalpha\nbeta\n  \n\ngamma\n\n")
    blank = list(read_documents([path], text_split="blank-lines"))
    assert [(d.text, d.meta["line"]) for d in blank] == [("alpha\nbeta", 3), ("gamma", 7)]
    whole = [d.text for d in read_documents([path], text_split="none")]
    assert whole == ["\n\nalpha\nbeta\n  \n\ngamma\n\n"]
    with pytest.raises(InputError, match="text_split 'lines'"):
        list(read_documents([path], text_split="lines"))


def test_globs_and_input_errors(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert [p.name for p in expand_inputs([str(tmp_path / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(InputError, match="matched no files"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(InputError, match="more than once"):
        expand_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl")])
    (tmp_path / "data.json").write_text("[]")
    with pytest.raises(InputError, match=r"data\.json: unknown input type"):
        expand_inputs([str(tmp_path / "data.json")])


def test_bad_jsonl_names_file_and_line(tmp_path: Path, tok: SRPTokenizer) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(InputError, match=rf"{bad}:3: invalid JSON"):
        preprocess([bad], tmp_path / "out", tok, progress=False)
    assert _leftovers(tmp_path) in ([], ["out.work"])  # shards kept for resuming
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(InputError, match=rf"{bad}:2: missing key 'text' \(keys: body\)"):
        list(read_documents([bad]))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(InputError, match=rf"{bad}:1: key 'text' is int"):
        list(read_documents([bad]))


def test_parquet(tmp_path: Path, tok: SRPTokenizer) -> None:
    path = tmp_path / "web.parquet"
    texts = ["first page", "second page\nwith two lines", "third"]
    pq.write_table(pa.table({"content": texts, "url": ["a", "b", "c"]}), path)
    preprocess([path], tmp_path / "web", tok, text_key="content", progress=False)
    _assert_dataset_matches(tmp_path / "web", texts, tok)
    assert [d.meta["fields"] for d in read_documents([path], text_key="content")][1] == {"url": "b"}
    with pytest.raises(InputError, match=rf"{path}: no column 'text' \(columns: content, url\)"):
        preprocess([path], tmp_path / "out", tok, progress=False)


def test_existing_output_refused_then_overwritten(
    tmp_path: Path, shakespeare: Path, tok: SRPTokenizer
) -> None:
    prefix = tmp_path / "out"
    first = preprocess([shakespeare], prefix, tok, progress=False)
    with pytest.raises(FileExistsError, match="out.bin"):
        preprocess([shakespeare], prefix, tok, progress=False)
    second = preprocess(
        [shakespeare], prefix, tok, stages=[SplitSpeakers()], overwrite=True, progress=False
    )
    assert read_dataset_meta(prefix)["counts"]["documents"] == second.documents != first.documents
    assert len(_sequences(prefix)) == second.documents


def test_stage_can_drop_and_split(tmp_path: Path, shakespeare: Path, tok: SRPTokenizer) -> None:
    preprocess([shakespeare], tmp_path / "out", tok, stages=[SplitSpeakers()], progress=False)
    expected = []
    for doc in read_documents([shakespeare]):
        speaker, _, speech = doc.text.partition("\n")
        if speaker != "All:":
            expected += [speaker, speech]
    assert "" in expected  # the slice ends in a speaker line: an empty speech, dropped
    _assert_dataset_matches(tmp_path / "out", [t for t in expected if t], tok)
    meta = read_dataset_meta(tmp_path / "out")
    assert meta["stages"] == [{"name": "split_speakers"}]
    assert meta["counts"]["empty_documents_dropped"] == expected.count("") == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_crash_leaves_no_complete_looking_output(
    tmp_path: Path, shared_data: Path, tok: SRPTokenizer, workers: int
) -> None:
    source = shared_data / "tinyshakespeare" / "input.txt"
    message = rf"stage 'explode_on' failed on document {source}:\d+: RuntimeError: boom"
    with pytest.raises(StageError, match=message):
        preprocess([source], tmp_path / "out", tok, stages=[ExplodeOn(20000)], workers=workers,
                   progress=False)
    # finished shards stay in out.work/ for a resumed run; nothing looks like a dataset
    assert _leftovers(tmp_path) in ([], ["out.work"])


def test_special_token_strings_in_raw_text(tmp_path: Path, tok: SRPTokenizer) -> None:
    source = tmp_path / "web.jsonl"
    planted = "great post<|reflect|>Safe<|/reflect|> more <|pa<|reflect|>d|> text<|endoftext|>"
    source.write_text(json.dumps({"text": planted}) + "\n")
    preprocess([source], tmp_path / "clean", tok, progress=False)
    (seq,) = _sequences(tmp_path / "clean")
    assert tok.detokenize(seq[:-1]) == "great postSafe more  text"
    assert not set(seq[:-1].tolist()) & set(tok.special_token_ids.values())
    preprocess([source], tmp_path / "raw", tok, stages=(), progress=False)
    (raw,) = _sequences(tmp_path / "raw")
    assert tok.reflect_open_id in raw.tolist() and tok.detokenize(raw[:-1]) == planted
    (stripped,) = StripSpecialTokens()(Document("d", "<|reflect|>x"))
    assert stripped.text == "x" and stripped.meta["special_tokens_stripped"] == 1


def test_read_dataset_meta_errors(tmp_path: Path, shakespeare: Path, tok: SRPTokenizer) -> None:
    prefix = tmp_path / "ds"
    with pytest.raises(FileNotFoundError, match="ds.meta.json not found"):
        read_dataset_meta(prefix)
    preprocess([shakespeare], prefix, tok, progress=False)
    with pytest.raises(ValueError, match="not the tokenizer in use \\(fingerprint 0000\\)"):
        read_dataset_meta(prefix, expected_fingerprint="0000")
    meta_path = dataset_paths(prefix)["meta"]
    meta_path.write_text('{"format_version": 1,\n "kind": ')
    with pytest.raises(ValueError, match=rf"{meta_path}:2: corrupt JSON"):
        read_dataset_meta(prefix)
    meta_path.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="key 'kind' missing"):
        read_dataset_meta(prefix)
    meta_path.unlink()
    with pytest.raises(FileNotFoundError, match="the .bin exists"):
        read_dataset_meta(prefix)


def test_preprocess_tool(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    tool = runpy.run_path(str(REPO_ROOT / "tools" / "preprocess_srp.py"))
    argv = [
        "--input", str(shared_data / "toxigen" / "*.jsonl"),
        "--output-prefix", str(tmp_path / "tox"),
        "--workers", "1",
    ]
    assert tool["main"](argv) == 0
    out = capsys.readouterr().out
    assert "| raw | raw | 722 | " in out and "722 documents in " in out
    assert str(tmp_path / "tox") in out and (tmp_path / "tox.meta.json").is_file()
    assert tool["main"](argv) == 2
    assert "output exists" in capsys.readouterr().err


@pytest.mark.parametrize("vocab", [8192, 70000])
@pytest.mark.parametrize("count", [0, 1, 37])
def test_index_writer_matches_megatrons_builder(vocab, count, tmp_path) -> None:
    """Our .idx writer (no megatron.core import) gives the bytes of Megatron's own builder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_srp.data.indexed import optimal_dtype, write_index

    dtype = optimal_dtype(vocab)
    assert dtype == DType.optimal_dtype(vocab)
    rng = np.random.default_rng(count)
    docs = [rng.integers(0, min(vocab, 60000), int(n)) for n in rng.integers(1, 500, count)]
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    write_index(tmp_path / "ours.idx", dtype, lengths, np.arange(count + 1))
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    if not count:
        return  # Megatron cannot mmap an empty .bin
    (tmp_path / "ours.bin").write_bytes((tmp_path / "theirs.bin").read_bytes())
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == count and all((ds[i] == d).all() for i, d in enumerate(docs))
