"""Corpus -> Megatron indexed dataset (``.bin/.idx``) + ``.meta.json`` + a copy of the tokenizer.

Documents are streamed from the readers, pushed through the stages and tokenized in worker
processes, and written in input order, so the output is byte-identical for any worker count.
Everything is written under temporary names and renamed at the end, ``meta.json`` last: a
dataset whose ``meta.json`` exists is complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

import megatron_srp
from megatron_srp.data.pipeline import (
    ChunkResult,
    Document,
    DocumentProcessor,
    Stage,
    default_stages,
    describe_stages,
    init_worker,
    run_worker_chunk,
)
from megatron_srp.data.readers import expand_inputs, input_format, read_documents
from megatron_srp.data.tokenizer import SRPTokenizer

META_FORMAT_VERSION = 1
META_KIND = "megatron-srp-indexed-dataset"
_REQUIRED_META = {
    "format_version": int,
    "kind": str,
    "config_hash": str,
    "tokenizer": dict,
    "counts": dict,
    "files": dict,
    "stages": list,
}
_REQUIRED_TOKENIZER_META = ("name", "fingerprint", "vocab_size", "eod", "pad")
_CHUNK_DOCS = 256
_CHUNK_CHARS = 1 << 20


def dataset_paths(prefix: str | Path) -> dict[str, Path]:
    """The files one dataset occupies: ``bin``, ``idx``, ``meta`` and the ``tokenizer`` dir."""
    prefix = str(prefix)
    return {
        "bin": Path(prefix + ".bin"),
        "idx": Path(prefix + ".idx"),
        "meta": Path(prefix + ".meta.json"),
        "tokenizer": Path(prefix + ".tokenizer"),
    }


@dataclass
class PreprocessResult:
    """Where the dataset went and what it holds; ``meta`` is the content of ``meta.json``."""

    output_prefix: Path
    paths: dict[str, Path]
    documents_in: int
    documents: int
    tokens: int
    seconds: float
    meta: dict[str, Any]

    @property
    def docs_per_second(self) -> float:
        return self.documents_in / self.seconds if self.seconds > 0 else float("inf")


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: SRPTokenizer,
    stages: Sequence[Stage] | None = None,
    workers: int = 1,
    *,
    text_key: str = "text",
    text_split: str = "blank-lines",
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize ``inputs`` (paths or globs) into a Megatron indexed dataset at ``output_prefix``.

    Each output document becomes one sequence ending in ``tokenizer.eod``; documents that are
    blank after the stages are dropped. ``stages=None`` means :func:`default_stages`; pass ``()``
    for none. ``workers > 1`` uses spawned processes that each load the tokenizer once.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    prefix = Path(output_prefix)
    if prefix.name.endswith((".bin", ".idx", ".meta.json")) or not prefix.name:
        raise ValueError(f"output prefix {str(output_prefix)!r} must be a path without extension")
    final = dataset_paths(prefix)
    existing = [str(p) for p in final.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output exists (pass overwrite=True to replace): {', '.join(existing)}"
        )
    stages = default_stages(tokenizer) if stages is None else list(stages)
    stage_descriptions = describe_stages(stages)
    paths = expand_inputs(inputs)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    processor = DocumentProcessor(tokenizer, tuple(stages), dtype)
    temp = dataset_paths(f"{prefix}.partial-{os.getpid()}")
    docs = read_documents(paths, text_key=text_key, text_split=text_split)
    started = time.perf_counter()
    documents_in = empty = documents = tokens = 0
    try:
        builder = IndexedDatasetBuilder(str(temp["bin"]), dtype=dtype)
        try:
            with (
                closing(_process(processor, _chunks(docs), workers)) as results,
                tqdm(desc="preprocess", unit="doc", disable=None if progress else True) as bar,
            ):
                for result in results:
                    for seq in result.sequences:
                        builder.add_document(seq, [seq.size])
                        tokens += seq.size
                    documents_in += result.documents_in
                    empty += result.empty_dropped
                    documents += len(result.sequences)
                    bar.update(result.documents_in)
        finally:
            builder.data_file.close()
        builder.finalize(str(temp["idx"]))
        seconds = time.perf_counter() - started
        tokenizer.save(temp["tokenizer"])
        counts = {
            "input_documents": documents_in,
            "empty_documents_dropped": empty,
            "documents": documents,
            "tokens": tokens,
        }
        meta = _dataset_meta(
            tokenizer, dtype, {"text_key": text_key, "text_split": text_split},
            stage_descriptions, paths, counts, seconds, workers, final,
        )
        temp["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(temp, final)
    finally:
        _remove(temp.values())
    return PreprocessResult(prefix, final, documents_in, documents, tokens, seconds, meta)


def _dataset_meta(
    tokenizer: SRPTokenizer,
    dtype: type[np.number],
    reader: dict[str, str],
    stages: list[dict[str, Any]],
    paths: list[Path],
    counts: dict[str, int],
    seconds: float,
    workers: int,
    final: dict[str, Path],
) -> dict[str, Any]:
    """The content of ``meta.json`` (see docs/data.md for the meaning of each key)."""
    meta: dict[str, Any] = {
        "format_version": META_FORMAT_VERSION,
        "kind": META_KIND,
        "megatron_srp_version": megatron_srp.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": "",
        "tokenizer": {
            "name": tokenizer.name,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "pad": tokenizer.pad,
            "special_tokens": dict(tokenizer.special_token_ids),
        },
        "dtype": np.dtype(dtype).name,
        "reader": reader,
        "stages": stages,
        "inputs": [
            {"path": str(p.resolve()), "format": input_format(p), "bytes": p.stat().st_size}
            for p in paths
        ],
        "counts": counts,
        "seconds": round(seconds, 3),
        "docs_per_second": round(counts["input_documents"] / seconds, 1) if seconds > 0 else None,
        "workers": workers,
        "files": {key: final[key].name for key in ("bin", "idx", "tokenizer")},
    }
    meta["config_hash"] = config_hash(meta)
    return meta


def config_hash(meta: dict[str, Any]) -> str:
    """Identity of what was computed: tokenizer, reader options, stages and inputs (path, size).

    Timings, worker count and creation time are left out: they do not change the output.
    """
    keyed = {
        "format_version": meta["format_version"],
        "tokenizer": meta["tokenizer"]["fingerprint"],
        "reader": meta["reader"],
        "stages": meta["stages"],
        "inputs": [(i["path"], i["bytes"]) for i in meta["inputs"]],
    }
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def read_dataset_meta(
    prefix: str | Path, expected_fingerprint: str | None = None
) -> dict[str, Any]:
    """Load and check ``<prefix>.meta.json``; with ``expected_fingerprint``, the tokenizer too.

    Raises FileNotFoundError for a missing or incomplete dataset and ValueError for a corrupt
    or foreign ``meta.json`` or a tokenizer mismatch.
    """
    paths = dataset_paths(prefix)
    meta_path = paths["meta"]
    if not meta_path.is_file():
        hint = " (the .bin exists: an interrupted or foreign run?)" if paths["bin"].exists() else ""
        raise FileNotFoundError(f"dataset metadata {meta_path} not found{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}:{exc.lineno}: corrupt JSON: {exc.msg}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    for key, kind in _REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{meta_path}: key {key!r} missing or not a {kind.__name__}")
    if meta["kind"] != META_KIND or meta["format_version"] != META_FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: kind {meta['kind']!r} version {meta['format_version']} is not "
            f"{META_KIND!r} version {META_FORMAT_VERSION}"
        )
    for key in _REQUIRED_TOKENIZER_META:
        if key not in meta["tokenizer"]:
            raise ValueError(f"{meta_path}: key 'tokenizer.{key}' missing")
    for key in ("bin", "idx"):
        if not paths[key].is_file():
            raise FileNotFoundError(f"{meta_path} describes a dataset but {paths[key]} is missing")
    found = meta["tokenizer"]["fingerprint"]
    if expected_fingerprint is not None and found != expected_fingerprint:
        raise ValueError(
            f"{meta_path}: dataset was tokenized with {meta['tokenizer']['name']!r} "
            f"(fingerprint {found}), not the tokenizer in use (fingerprint {expected_fingerprint})"
        )
    return meta


def _chunks(docs: Iterable[Document]) -> Iterator[list[Document]]:
    """Group documents so that one task is big enough to amortise inter-process traffic."""
    chunk: list[Document] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc.text)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _process(
    processor: DocumentProcessor, chunks: Iterator[list[Document]], workers: int
) -> Iterator[ChunkResult]:
    """Results in input order. A bounded window of tasks keeps memory flat on any corpus size
    (``Pool.imap`` would read the whole input ahead)."""
    if workers == 1:
        yield from map(processor, chunks)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch threads exist
    # ProcessPoolExecutor rather than Pool: on an error, Pool's terminate() kills workers that
    # may hold the task queue's lock and can deadlock; the executor cancels what has not
    # started and lets running chunks finish.
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                                   initargs=(processor,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(executor.submit(run_worker_chunk, chunk))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _publish(temp: dict[str, Path], final: dict[str, Path]) -> None:
    """Move the finished files into place; the old meta.json goes first and the new one last,
    so no moment exists where a meta.json sits beside files it does not describe."""
    final["meta"].unlink(missing_ok=True)
    if final["tokenizer"].exists():
        shutil.rmtree(final["tokenizer"])
    for key in ("tokenizer", "bin", "idx", "meta"):
        os.replace(temp[key], final[key])


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
