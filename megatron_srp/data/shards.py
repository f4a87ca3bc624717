"""Cut the inputs into shards that workers (local processes or Ray actors) read on their own.

A shard is a byte range of one JSONL or text file (starting at a document boundary) or a row
range of one Parquet file. The cut depends only on the inputs and ``shard_bytes``, never on
the number of workers, so every backend and worker count writes the same shards, and a resumed
run can recognise the shards it already finished.

The scan reads each input once, cheaply (it splits lines; it parses JSON only to find
duplicate ids when ``id_key`` is set), so a worker can seek straight to its shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_srp.data.readers import (
    DEFAULT_MAX_CHARS,
    WIKITEXT_TITLE,
    OnReject,
    input_format,
    open_binary,
    read_jsonl,
    read_parquet,
    read_text,
    record_id,
)
from megatron_srp.documents import Document

DEFAULT_SHARD_BYTES = 16 << 20


@dataclass(frozen=True)
class ShardSpec:
    """What one worker reads: ``[start, end)`` bytes (JSONL/text) or rows (Parquet) of ``path``.

    ``first_line`` is the 1-based line number at ``start``; ``skip`` maps line numbers (rows for
    Parquet) to the reason they must be rejected: duplicate ids, found by the scan because no
    single worker sees the whole corpus.
    """

    index: int
    path: str
    format: str
    start: int
    end: int
    first_line: int = 1
    skip: dict[int, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes (rows for Parquet): the unit of the progress bar."""
        return self.end - self.start


@dataclass(frozen=True)
class ReaderOptions:
    """How records become documents; part of the run's identity (config hash)."""

    text_key: str = "text"
    text_split: str = "blank-lines"
    id_key: Optional[str] = None
    max_chars: int = DEFAULT_MAX_CHARS


def scan_shards(paths: Sequence[Path], options: ReaderOptions,
                shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[ShardSpec]:
    """All shards of all inputs, in input order, numbered from 0."""
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    seen_ids: dict[str, str] = {}
    specs: list[ShardSpec] = []
    for path in paths:
        fmt = input_format(path)
        if fmt == "parquet":
            ranges = _parquet_ranges(path, shard_bytes, options.id_key, options.text_key, seen_ids)
        else:
            ranges = _line_ranges(path, fmt, shard_bytes, options, seen_ids)
        for start, end, first_line, skip in ranges:
            specs.append(ShardSpec(len(specs), str(path), fmt, start, end, first_line, skip))
    return specs


def _line_ranges(path: Path, fmt: str, shard_bytes: int, options: ReaderOptions,
                 seen_ids: dict[str, str]) -> Iterator[tuple[int, int, int, dict[int, str]]]:
    """Byte ranges ending at line boundaries where a new document may start."""
    start, start_line, offset = 0, 1, 0
    skip: dict[int, str] = {}
    lineno = 0
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if offset - start >= shard_bytes and _may_start_document(raw, fmt, options.text_split):
                yield start, offset, start_line, skip
                start, start_line, skip = offset, lineno, {}
            if fmt == "jsonl" and options.id_key is not None:
                _check_duplicate(raw, path, lineno, options, seen_ids, skip)
            offset += len(raw)
    if offset > start:
        yield start, offset, start_line, skip


def _may_start_document(raw: bytes, fmt: str, text_split: str) -> bool:
    if fmt == "jsonl":
        return True
    if text_split == "blank-lines":
        return not raw.strip()
    if text_split == "wikitext-articles":
        try:
            return WIKITEXT_TITLE.fullmatch(raw.decode("utf-8").rstrip("\r\n")) is not None
        except UnicodeDecodeError:
            return False
    return False  # "none": the whole file is one document


def _check_duplicate(raw: bytes, path: Path, lineno: int, options: ReaderOptions,
                     seen_ids: dict[str, str], skip: dict[int, str]) -> None:
    if options.id_key.encode() not in raw:
        return
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # the worker rejects it with the precise reason
    if isinstance(record, dict):
        _note_id(record_id(record, options.id_key), f"{path}:{lineno}", lineno, seen_ids, skip)


def _note_id(doc_id: Optional[str], where: str, key: int, seen_ids: dict[str, str],
             skip: dict[int, str]) -> None:
    if doc_id is None:
        return
    first = seen_ids.setdefault(doc_id, where)
    if first != where:
        skip[key] = f"duplicate id {doc_id!r} (first seen at {first})"


def _parquet_ranges(path: Path, shard_bytes: int, id_key: Optional[str], text_key: str,
                    seen_ids: dict[str, str]) -> Iterator[tuple[int, int, int, dict[int, str]]]:
    """Row ranges made of whole row groups, about ``shard_bytes`` (uncompressed) each."""
    import pyarrow.parquet as pq  # on first use: its import costs 0.2 s per process

    parquet = pq.ParquetFile(path)
    metadata = parquet.metadata
    ids: list = []
    if id_key is not None and id_key in parquet.schema_arrow.names and id_key != text_key:
        ids = parquet.read(columns=[id_key]).column(0).to_pylist()
    start = rows = size = 0
    skip: dict[int, str] = {}
    for group in range(metadata.num_row_groups):
        if size >= shard_bytes:
            yield start, rows, 1, skip
            start, size, skip = rows, 0, {}
        group_rows = metadata.row_group(group).num_rows
        for row in range(rows, rows + group_rows):
            if ids:
                doc_id = ids[row] if isinstance(ids[row], (str, int)) else None
                _note_id(None if doc_id is None else str(doc_id), f"{path} row {row}", row,
                         seen_ids, skip)
        rows += group_rows
        size += metadata.row_group(group).total_byte_size
    if rows > start:
        yield start, rows, 1, skip


def read_shard(spec: ShardSpec, options: ReaderOptions,
               on_reject: OnReject = None) -> Iterator[Document]:
    """The documents of one shard, in file order."""
    path = Path(spec.path)
    if spec.format == "jsonl":
        return read_jsonl(path, options.text_key, start=spec.start, end=spec.end,
                          first_line=spec.first_line, id_key=options.id_key,
                          max_chars=options.max_chars, on_reject=on_reject, skip=spec.skip)
    if spec.format == "parquet":
        return read_parquet(path, options.text_key, start=spec.start, end=spec.end,
                            id_key=options.id_key, max_chars=options.max_chars,
                            on_reject=on_reject, skip=spec.skip)
    return read_text(path, options.text_split, start=spec.start, end=spec.end,
                     first_line=spec.first_line, max_chars=options.max_chars,
                     on_reject=on_reject)
