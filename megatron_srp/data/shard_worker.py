"""The work of one shard: read -> stages -> segment + classify -> every variant -> tokenize.

A worker (a local process or a Ray actor) builds one :class:`ShardProcessor` and calls it for
each shard it is given. Per variant it writes ``<work>/<variant>/shard-NNNNNN.bin`` (token ids),
``.lengths.npy`` (one length per document) and ``.labels.jsonl`` (the label sidecar, with
shard-local document numbers); rejected records go to ``<work>/rejects/shard-NNNNNN.jsonl``.
``<work>/done/shard-NNNNNN.json`` (the shard's counts) is written last, atomically: a shard
without it is redone from scratch by a resumed run.

Like ``megatron_srp/documents.py``, this module imports nothing from ``megatron.core``
(seconds per worker).
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional

import numpy as np

from megatron_srp.data.labeling import Labeler
from megatron_srp.data.readers import InputError, Reject
from megatron_srp.data.shards import ReaderOptions, ShardSpec, read_shard
from megatron_srp.documents import Document, Stage, apply_stages
from megatron_srp.reflection.types import ClassifiedDocument
from megatron_srp.tokenizer import SRPTokenizer
from megatron_srp.units import write_atomic

CHUNK_DOCS = 256
CHUNK_CHARS = 1 << 20


class ShardFailed(RuntimeError):
    """A worker could not read or write a shard's files; the message names the shard, the
    node and the cause."""


def shard_failed(spec: ShardSpec, cause: BaseException) -> ShardFailed:
    unit = "rows" if spec.format == "parquet" else "bytes"
    return ShardFailed(
        f"shard {spec.index} ({spec.path} {unit} {spec.start}-{spec.end}) failed on node "
        f"{socket.gethostname()}: {type(cause).__name__}: {cause}. Every node must see the "
        "inputs and the work directory at the same paths (a shared file system); finished "
        "shards are kept, so a rerun resumes.")


@dataclass(frozen=True)
class Variant:
    """One output dataset of a run: a name and the intervention that makes its documents."""

    name: str
    intervention: Any  # an Intervention (megatron_srp.interventions)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def done_path(work_dir: Path, index: int) -> Path:
    return work_dir / "done" / f"{shard_name(index)}.json"


def variant_shard_prefix(work_dir: Path, variant: str, index: int) -> Path:
    return work_dir / variant / shard_name(index)


class _VariantWriter:
    """Token ids, lengths and label-sidecar lines of one variant in one shard. Documents are
    gathered in one flat id list and written as one array per chunk (:meth:`flush`)."""

    def __init__(self, prefix: Path, dtype: np.dtype, with_labels: bool) -> None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.dtype = dtype
        self.bin: IO[bytes] = open(f"{prefix}.bin", "wb")
        self.labels: Optional[IO[str]] = (
            open(f"{prefix}.labels.jsonl", "w", encoding="utf-8") if with_labels else None)
        self.lengths: list[int] = []
        self.counts: Counter = Counter()
        self._pending: list[int] = []

    def add(self, ids: list[int], eod: int) -> int:
        """Append one document; returns its shard-local number."""
        self._pending += ids
        self._pending.append(eod)
        self.lengths.append(len(ids) + 1)
        self.counts["documents"] += 1
        self.counts["tokens"] += len(ids) + 1
        return len(self.lengths) - 1

    def flush(self) -> None:
        """Write the pending documents' ids as one array."""
        if self._pending:
            self.bin.write(np.array(self._pending, dtype=self.dtype).tobytes(order="C"))
            self._pending = []

    def close(self) -> None:
        self.flush()
        self.bin.close()
        np.save(f"{self.prefix}.lengths.npy", np.array(self.lengths, dtype=np.int64))
        if self.labels is not None:
            self.labels.close()


@dataclass
class ShardProcessor:
    """Everything a worker needs; picklable (tokenizer and classifier load lazily)."""

    tokenizer: SRPTokenizer
    reader: ReaderOptions
    stages: tuple[Stage, ...]
    labeler: Labeler
    variants: tuple[Variant, ...]
    dtype_name: str
    work_dir: str
    strict: bool = False
    chunk_docs: int = CHUNK_DOCS

    def __call__(self, spec: ShardSpec) -> dict[str, Any]:
        """Process one shard and return (and record in its done file) its counts."""
        try:
            return self._process(spec)
        except OSError as exc:  # an input it cannot read, a work directory it cannot write
            raise shard_failed(spec, exc) from exc

    def _process(self, spec: ShardSpec) -> dict[str, Any]:
        work = Path(self.work_dir)
        dtype = np.dtype(self.dtype_name)
        with_labels = self.labeler.classifier is not None
        writers = {v.name: _VariantWriter(variant_shard_prefix(work, v.name, spec.index), dtype,
                                          with_labels) for v in self.variants}
        rejects_path = work / "rejects" / f"{shard_name(spec.index)}.jsonl"
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
        counts: Counter = Counter()
        reasons: Counter = Counter()
        categories: Counter = Counter()
        with open(rejects_path, "w", encoding="utf-8") as rejects:
            def on_reject(reject: Reject) -> None:
                rejects.write(json.dumps(reject.to_json(), ensure_ascii=False) + "\n")
                reasons[reason_kind(reject.reason)] += 1

            docs = read_shard(spec, self.reader, None if self.strict else on_reject)
            for chunk in _chunks(docs, self.chunk_docs):
                counts["documents_read"] += len(chunk)
                staged = [d for doc in chunk for d in apply_stages(doc, self.stages)]
                kept = [d for d in staged if d.text.strip()]
                counts["empty_after_stages"] += len(staged) - len(kept)
                labelled = []
                for item, encoding in self.labeler.label(kept):
                    if isinstance(item, Reject):
                        if self.strict:
                            raise InputError(f"{item.location}: {item.reason}")
                        on_reject(item)
                        continue
                    _count_labels(item, counts, categories)
                    labelled.append((item, encoding))
                for variant in self.variants:
                    self._write_variant(variant, labelled, writers[variant.name])
        for writer in writers.values():
            writer.close()
        result = {
            "shard": spec.index, "path": spec.path, "start": spec.start, "end": spec.end,
            "node": socket.gethostname(),
            **counts, "rejected": sum(reasons.values()), "reject_reasons": dict(reasons),
            "categories": dict(categories),
            "variants": {name: dict(w.counts) for name, w in writers.items()},
        }
        _write_atomic(done_path(work, spec.index), json.dumps(result, sort_keys=True))
        return result

    def _write_variant(self, variant: Variant, labelled: list[tuple[ClassifiedDocument, Any]],
                       writer: _VariantWriter) -> None:
        """One variant's output for a chunk of documents. Outputs built from the input's own
        tokens are not encoded again (the input's encoding, when labelling made one): an
        unchanged text reuses it, and reflections are spliced between the input's segment
        tokens (:func:`_splice`). Every other output text of the chunk is encoded in one batch
        call; without a label sidecar only ids are needed (no offsets)."""
        eod = self.tokenizer.eod
        planned = []
        for doc, source in labelled:
            outs = [o for o in variant.intervention(doc) if o.text.strip()]
            writer.counts["documents_without_output"] += 0 if outs else 1
            source_ids = source.ids if source is not None else None
            tokenized: list[Optional[tuple[list[int], Optional[Callable]]]] = []
            for out in outs:
                if source is not None and out.text == doc.text:
                    tokenized.append((source_ids, partial(_token_span, source)))
                else:
                    tokenized.append(_splice(doc, source_ids, out, self._special_ids))
            planned.append((doc, outs, tokenized))
        changed = [o.text for _, outs, tok in planned for o, t in zip(outs, tok) if t is None]
        if writer.labels is None:
            fresh = iter(self.tokenizer.tokenize_batch(changed) if changed else [])
            for _doc, _outs, tokenized in planned:
                for done in tokenized:
                    writer.add(next(fresh) if done is None else done[0], eod)
            writer.flush()
            return
        encodings = iter(self.tokenizer.encode_batch(changed) if changed else [])
        for doc, outs, tokenized in planned:
            placed: dict[int, tuple[int, Optional[list[int]]]] = {}
            for out, done in zip(outs, tokenized):
                if done is None:
                    encoding = next(encodings)
                    done = (encoding.ids, partial(_token_span, encoding))
                ids, token_span = done
                number = writer.add(ids, eod)
                for index, span in _segment_spans(out, len(doc.segments)):
                    placed.setdefault(index, (number, None if span is None else token_span(*span)))
            writer.labels.write(_sidecar_lines(doc, placed))
            writer.counts["segments_placed"] += len(placed)
        writer.flush()

    def _special_ids(self, text: str) -> list[int]:
        """Ids of a reflection string (memoised: there are only a few distinct ones)."""
        cache = self.__dict__.setdefault("_reflection_ids", {})
        if text not in cache:
            cache[text] = self.tokenizer.tokenize(text)
        return cache[text]


def _splice(doc: ClassifiedDocument, source_ids: Optional[list[int]], out: Document,
            special_ids: Callable[[str], list[int]]
            ) -> Optional[tuple[list[int], Callable]]:
    """Ids for an output that is the input text with reflections inserted at segment ends
    (``meta["reflection_spans"]``): the input's own tokens, cut at segment boundaries, with
    each reflection's ids in between. The segments are cut on token boundaries, so the text
    part is token for token the ``raw`` variant's. Returns None (encode the text instead) for
    any other output."""
    spans = out.meta.get("reflection_spans")
    if source_ids is None or spans is None:
        return None
    token_at = {0: 0}
    for seg, start in zip(doc.segments, _cumulative(doc)):
        token_at[seg.end] = start + seg.num_tokens
    if token_at.get(len(doc.text)) != len(source_ids):
        return None
    text, ids, boundaries = out.text, [], {}
    out_pos = src_pos = 0
    for a, b in [*spans, [len(text), len(text)]]:
        src_end = src_pos + (a - out_pos)
        if src_end not in token_at or text[out_pos:a] != doc.text[src_pos:src_end]:
            return None
        boundaries[out_pos] = len(ids)
        ids += source_ids[token_at[src_pos]:token_at[src_end]]
        boundaries[a] = len(ids)
        ids += special_ids(text[a:b]) if b > a else []
        out_pos, src_pos = b, src_end
    if src_pos != len(doc.text):
        return None

    def token_span(start: int, end: int) -> Optional[list[int]]:
        first, last = boundaries.get(start), boundaries.get(end)
        return None if first is None or last is None or last <= first else [first, last]

    return ids, token_span


def _cumulative(doc: ClassifiedDocument) -> Iterator[int]:
    """The first token of each segment in the input's tokenization."""
    total = 0
    for seg in doc.segments:
        yield total
        total += seg.num_tokens


def _segment_spans(out: Document, n: int) -> Iterator[tuple[int, Optional[list[int]]]]:
    """(segment index, character span in ``out`` or None) for the segments ``out`` carries."""
    spans = out.meta.get("segment_spans")
    if spans is not None:
        for index, span in enumerate(spans[:n]):
            if span is not None:
                yield index, span
    elif "source_segment" in out.meta:  # a dialogue made from one segment (refusal)
        yield out.meta["source_segment"], None


def _token_span(encoding: Any, start: int, end: int) -> Optional[list[int]]:
    """Tokens covering characters ``[start, end)``: from the token holding ``start`` to the one
    holding ``end - 1``."""
    if end <= start:
        return None
    first = encoding.char_to_token(start)
    last = encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    return [first, last + 1]


def _sidecar_lines(doc: ClassifiedDocument, placed: dict[int, tuple[int, Optional[list[int]]]]
                   ) -> str:
    """The document's label-sidecar lines: exactly ``json.dumps(record, ensure_ascii=False)``
    per segment, formatted directly (a dumps call per segment cost 2% of preprocessing)."""
    head = '{"doc_id": ' + json.dumps(doc.doc_id, ensure_ascii=False) + ', "segment": '
    lines = []
    token_cursor = 0
    for seg, label in zip(doc.segments, doc.labels):
        number, tokens = placed.get(seg.index, (None, None))
        end = token_cursor + seg.num_tokens
        lines.append(
            f'{head}{seg.index}, "chars": [{seg.start}, {seg.end}], "source_tokens": '
            f'[{token_cursor}, {end}], "label": "{"safe" if label.safe else "unsafe"}", '
            f'"category": {_json_scalar(label.category)}, '
            f'"score": {_json_scalar(round(float(label.score), 6))}, '
            f'"dataset_doc": {_json_scalar(number)}, "tokens": '
            f'{"null" if tokens is None else f"[{tokens[0]}, {tokens[1]}]"}'
            f'{_UNPARSED if label.unparsed else ""}}}\n')
        token_cursor = end
    return "".join(lines)


_UNPARSED = ', "unparsed": true'


def _json_scalar(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)`` for None, an int, a str or a float."""
    if value is None:
        return "null"
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _count_labels(doc: ClassifiedDocument, counts: Counter, categories: Counter) -> None:
    counts["documents_labelled"] += 1
    for seg, label in zip(doc.segments, doc.labels):
        counts["segments"] += 1
        counts["source_tokens"] += seg.num_tokens
        counts["unparsed_labels"] += int(label.unparsed)
        if not label.safe:
            counts["unsafe_segments"] += 1
            categories[label.category or "none"] += 1


def reason_kind(reason: str) -> str:
    """The reason without its details: ``invalid JSON: Expecting value (column 3)`` ->
    ``invalid JSON``; used to summarise rejects."""
    return reason.split(" (")[0].split(":")[0].strip()


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    """Groups of documents, so classification and tokenization run in batches."""
    chunk: list[Document] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc.text)
        if len(chunk) >= size or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text + "\n")


_WORKER: Optional[ShardProcessor] = None


def init_worker(processor: ShardProcessor) -> None:
    """Process-pool initializer: keep the processor (tokenizer loaded once) for the worker."""
    global _WORKER
    # Worker processes already use every core; the tokenizer's thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = processor


def run_worker_shard(spec: ShardSpec) -> dict[str, Any]:
    if _WORKER is None:
        raise RuntimeError("run_worker_shard called in a process init_worker did not set up")
    return _WORKER(spec)

