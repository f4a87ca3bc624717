"""Input readers: JSONL, Parquet and plain text files, streamed as :class:`Document` objects.

Every error names the file and the line, row or column at fault, because corpora are large
and "KeyError: 'text'" after an hour of preprocessing is not actionable.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import pyarrow.parquet as pq

from megatron_srp.data.pipeline import Document

TEXT_SPLITS = ("blank-lines", "wikitext-articles", "none")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".tokens", ".raw", ".md")

# " = Title = " starts a WikiText article; " = = Section = = " does not.
_WIKITEXT_TITLE = re.compile(r" = ([^=](?:.*[^=])?) = ")
_PARQUET_BATCH_ROWS = 1024


class InputError(ValueError):
    """Bad input data; the message says where."""


def input_format(path: Path) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"text"``, decided by the file name's suffix."""
    name = path.name.lower()
    for fmt, suffixes in (
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
        ("text", TEXT_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return fmt
    raise InputError(
        f"{path}: unknown input type; expected one of "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)}"
    )


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Expand globs (sorted, so the order is reproducible) and check every input exists once."""
    if not patterns:
        raise InputError("no inputs given")
    paths: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"input pattern {pattern!r} matched no files")
            paths.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(pattern).is_file():
            paths.append(Path(pattern))
        else:
            raise InputError(f"input file {pattern!r} does not exist")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise InputError(f"input file {path} is listed more than once")
        seen.add(path.resolve())
        input_format(path)
    return paths


def read_documents(
    paths: Sequence[Path], text_key: str = "text", text_split: str = "blank-lines"
) -> Iterator[Document]:
    """All documents of all inputs, in input order."""
    if text_split not in TEXT_SPLITS:
        raise InputError(f"text_split {text_split!r} is not one of {', '.join(TEXT_SPLITS)}")
    for path in paths:
        fmt = input_format(path)
        if fmt == "jsonl":
            yield from read_jsonl(path, text_key)
        elif fmt == "parquet":
            yield from read_parquet(path, text_key)
        else:
            yield from read_text(path, text_split)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) with UTF-8 errors reported by line."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None


def read_jsonl(path: Path, text_key: str = "text") -> Iterator[Document]:
    """One document per non-blank line; the other keys of the record go to ``meta["fields"]``."""
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise InputError(
                f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
            )
        if text_key not in record:
            raise InputError(
                f"{path}:{lineno}: missing key {text_key!r} (keys: {', '.join(map(str, record))})"
            )
        text = record.pop(text_key)
        if not isinstance(text, str):
            raise InputError(
                f"{path}:{lineno}: key {text_key!r} is {type(text).__name__}, not a string"
            )
        meta = {"source": str(path), "line": lineno, "fields": record}
        yield Document(f"{path}:{lineno}", text, meta)


def read_parquet(path: Path, text_key: str = "text") -> Iterator[Document]:
    """One document per row, streamed in batches; other columns go to ``meta["fields"]``."""
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_key not in columns:
        raise InputError(f"{path}: no column {text_key!r} (columns: {', '.join(columns)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            text = record.pop(text_key)
            if not isinstance(text, str):
                raise InputError(
                    f"{path}: row {row}: column {text_key!r} is {type(text).__name__}, not a string"
                )
            meta = {"source": str(path), "row": row, "fields": record}
            yield Document(f"{path}:{row}", text, meta)
            row += 1


def read_text(path: Path, text_split: str = "blank-lines") -> Iterator[Document]:
    """Split a text file into documents.

    ``blank-lines``: paragraphs separated by whitespace-only lines. ``wikitext-articles``: a new
    document at each `` = Title = `` line (section headings stay inside). ``none``: the whole
    file, verbatim. Leading/trailing blank lines and the final newline are dropped from blocks.
    """
    if text_split == "none":
        text = "".join(line for _, line in _decoded_lines(path))
        if text.strip():
            yield Document(str(path), text, {"source": str(path), "line": 1})
        return
    block: list[str] = []
    start = 1
    meta: dict[str, Any] = {}
    for lineno, line in _decoded_lines(path):
        if text_split == "blank-lines" and not line.strip():
            yield from _block_document(path, block, start, meta)
            block = []
            continue
        title = (
            _WIKITEXT_TITLE.fullmatch(line.rstrip("\r\n"))
            if text_split == "wikitext-articles"
            else None
        )
        if title is not None:
            yield from _block_document(path, block, start, meta)
            block, meta = [], {"title": title.group(1)}
        if not block:
            start = lineno
        block.append(line)
    yield from _block_document(path, block, start, meta)


def _block_document(
    path: Path, lines: list[str], start: int, extra: dict[str, Any]
) -> Iterator[Document]:
    """A document from a block of lines, or nothing if the block is blank."""
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return
    last = max(i for i, line in enumerate(lines) if line.strip())
    text = "".join(lines[first : last + 1]).rstrip("\r\n")
    lineno = start + first
    yield Document(f"{path}:{lineno}", text, {"source": str(path), "line": lineno, **extra})
