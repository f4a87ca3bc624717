"""Input readers: JSONL, Parquet and plain text files, streamed as :class:`Document` objects.

Every problem names the file and the line, row or column at fault, because corpora are large
and "KeyError: 'text'" after an hour of preprocessing is not actionable. A bad record is either
fatal (``on_reject=None``: an :class:`InputError`) or handed to ``on_reject`` as a
:class:`Reject` and skipped, so a preprocessing run can write it to its rejects file and go on.

Readers can start and stop inside a file (``start``/``end`` byte offsets for JSONL and text,
rows for Parquet): that is how a shard of a large input is read by one worker.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Sequence

from megatron_srp.documents import Document

TEXT_SPLITS = ("blank-lines", "wikitext-articles", "none")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".tokens", ".raw", ".md")
DEFAULT_MAX_CHARS = 2_000_000  # longer documents are rejected, not silently truncated

# " = Title = " starts a WikiText article; " = = Section = = " does not.
WIKITEXT_TITLE = re.compile(r" = ([^=](?:.*[^=])?) = ")
_PARQUET_BATCH_ROWS = 1024
_EXCERPT_CHARS = 200


class InputError(ValueError):
    """Bad input data; the message says where."""


@dataclass(frozen=True)
class Reject:
    """A record that was not turned into a document, and why. ``line`` is 1-based (JSONL and
    text files); ``row`` is 0-based (Parquet)."""

    source: str
    line: Optional[int]
    row: Optional[int]
    reason: str
    excerpt: str = ""

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source} row {self.row}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.source, "line": self.line, "row": self.row, "reason": self.reason,
                "excerpt": self.excerpt}


OnReject = Optional[Callable[[Reject], None]]


def _report(reject: Reject, on_reject: OnReject) -> None:
    if on_reject is None:
        raise InputError(f"{reject.location}: {reject.reason}")
    on_reject(reject)


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
    paths: Sequence[Path], text_key: str = "text", text_split: str = "blank-lines",
    on_reject: OnReject = None,
) -> Iterator[Document]:
    """All documents of all inputs, in input order."""
    check_text_split(text_split)
    for path in paths:
        fmt = input_format(path)
        if fmt == "jsonl":
            yield from read_jsonl(path, text_key, on_reject=on_reject)
        elif fmt == "parquet":
            yield from read_parquet(path, text_key, on_reject=on_reject)
        else:
            yield from read_text(path, text_split, on_reject=on_reject)


def check_text_split(text_split: str) -> None:
    if text_split not in TEXT_SPLITS:
        raise InputError(f"text_split {text_split!r} is not one of {', '.join(TEXT_SPLITS)}")


def open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _excerpt(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text[: _EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    return text[:_EXCERPT_CHARS]


def _lines(path: Path, start: int, end: Optional[int], first_line: int,
           on_reject: OnReject) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for the lines starting in ``[start, end)``; a line
    that is not valid UTF-8 is rejected."""
    with open_binary(path) as f:
        if start:
            f.seek(start)
        offset = start
        for lineno, raw in enumerate(f, start=first_line):
            if end is not None and offset >= end:
                return
            offset += len(raw)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _report(Reject(str(path), lineno, None, f"not valid UTF-8 ({exc.reason} at byte "
                               f"{exc.start})", _excerpt(raw)), on_reject)


def check_text(text: Any, where: Reject, text_key: str, max_chars: int,
               on_reject: OnReject) -> bool:
    """Whether ``text`` is usable; otherwise report why, with ``where``'s location."""
    reason = None
    if not isinstance(text, str):
        reason = f"key {text_key!r} is {type(text).__name__}, not a string"
    elif not text.strip():
        reason = "empty text"
    elif len(text) > max_chars:
        reason = f"document too long ({len(text)} characters > max_chars {max_chars})"
    if reason is None:
        return True
    excerpt = _excerpt(text) if isinstance(text, str) else _excerpt(repr(text))
    _report(Reject(where.source, where.line, where.row, reason, excerpt), on_reject)
    return False


def read_jsonl(path: Path, text_key: str = "text", *, start: int = 0, end: Optional[int] = None,
               first_line: int = 1, id_key: Optional[str] = None,
               max_chars: int = DEFAULT_MAX_CHARS, on_reject: OnReject = None,
               skip: Optional[dict[int, str]] = None) -> Iterator[Document]:
    """One document per non-blank line; the other keys of the record go to ``meta["fields"]``.

    The document id is the record's ``id_key`` value when given and present, else
    ``<path>:<line>``. ``skip`` maps line numbers to a reason (duplicate ids found by a scan).
    """
    for lineno, line in _lines(path, start, end, first_line, on_reject):
        if not line.strip():
            continue
        here = Reject(str(path), lineno, None, "")
        if skip and lineno in skip:
            _report(Reject(str(path), lineno, None, skip[lineno], _excerpt(line)), on_reject)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            _report(Reject(str(path), lineno, None,
                           f"invalid JSON: {exc.msg} (column {exc.colno})", _excerpt(line)),
                    on_reject)
            continue
        if not isinstance(record, dict):
            _report(Reject(str(path), lineno, None,
                           f"expected a JSON object, got {type(record).__name__}", _excerpt(line)),
                    on_reject)
            continue
        if text_key not in record:
            _report(Reject(str(path), lineno, None, f"missing key {text_key!r} (keys: "
                           f"{', '.join(map(str, record)) or 'none'})", _excerpt(line)), on_reject)
            continue
        text = record.pop(text_key)
        if not check_text(text, here, text_key, max_chars, on_reject):
            continue
        doc_id = record_id(record, id_key) or f"{path}:{lineno}"
        yield Document(doc_id, text, {"source": str(path), "line": lineno, "fields": record})


def record_id(record: dict[str, Any], id_key: Optional[str]) -> Optional[str]:
    """The record's own id as a string, or None when there is no usable one."""
    if id_key is None:
        return None
    value = record.get(id_key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def read_parquet(path: Path, text_key: str = "text", *, start: int = 0,
                 end: Optional[int] = None, id_key: Optional[str] = None,
                 max_chars: int = DEFAULT_MAX_CHARS, on_reject: OnReject = None,
                 skip: Optional[dict[int, str]] = None) -> Iterator[Document]:
    """One document per row in ``[start, end)``, streamed in batches; other columns go to
    ``meta["fields"]``. A missing text column is always fatal: no row could be read."""
    import pyarrow.parquet as pq  # on first use: its import costs 0.2 s per process

    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_key not in columns:
        raise InputError(f"{path}: no column {text_key!r} (columns: {', '.join(columns)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        if row + batch.num_rows <= start:
            row += batch.num_rows
            continue
        for record in batch.to_pylist():
            if row < start:
                row += 1
                continue
            if end is not None and row >= end:
                return
            here = Reject(str(path), None, row, "")
            text = record.pop(text_key)
            if skip and row in skip:
                _report(Reject(str(path), None, row, skip[row], _excerpt(str(text))), on_reject)
            elif check_text(text, here, text_key, max_chars, on_reject):
                doc_id = record_id(record, id_key) or f"{path}:{row}"
                yield Document(doc_id, text, {"source": str(path), "row": row, "fields": record})
            row += 1


def read_text(path: Path, text_split: str = "blank-lines", *, start: int = 0,
              end: Optional[int] = None, first_line: int = 1,
              max_chars: int = DEFAULT_MAX_CHARS, on_reject: OnReject = None) -> Iterator[Document]:
    """Split a text file into documents.

    ``blank-lines``: paragraphs separated by whitespace-only lines. ``wikitext-articles``: a new
    document at each `` = Title = `` line (section headings stay inside). ``none``: the whole
    file, verbatim. Leading/trailing blank lines and the final newline are dropped from blocks.
    """
    check_text_split(text_split)
    lines = _lines(path, start, end, first_line, on_reject)
    if text_split == "none":
        text = "".join(line for _, line in lines)
        if text.strip() and check_text(text, Reject(str(path), first_line, None, ""), "text",
                                       max_chars, on_reject):
            yield Document(str(path), text, {"source": str(path), "line": first_line})
        return
    block: list[str] = []
    block_start = first_line
    meta: dict[str, Any] = {}
    for lineno, line in lines:
        if text_split == "blank-lines" and not line.strip():
            yield from _block_document(path, block, block_start, meta, max_chars, on_reject)
            block = []
            continue
        title = (
            WIKITEXT_TITLE.fullmatch(line.rstrip("\r\n"))
            if text_split == "wikitext-articles"
            else None
        )
        if title is not None:
            yield from _block_document(path, block, block_start, meta, max_chars, on_reject)
            block, meta = [], {"title": title.group(1)}
        if not block:
            block_start = lineno
        block.append(line)
    yield from _block_document(path, block, block_start, meta, max_chars, on_reject)


def _block_document(path: Path, lines: list[str], start: int, extra: dict[str, Any],
                    max_chars: int, on_reject: OnReject) -> Iterator[Document]:
    """A document from a block of lines, or nothing if the block is blank."""
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return
    last = max(i for i, line in enumerate(lines) if line.strip())
    text = "".join(lines[first : last + 1]).rstrip("\r\n")
    lineno = start + first
    if check_text(text, Reject(str(path), lineno, None, ""), "text", max_chars, on_reject):
        yield Document(f"{path}:{lineno}", text, {"source": str(path), "line": lineno, **extra})
