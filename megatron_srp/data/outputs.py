"""What a preprocessing run leaves on disk, and how shards become the final datasets.

Per variant: ``<prefix>.bin/.idx`` (Megatron's indexed dataset, merged from the shards;
:mod:`indexed` writes the index in Megatron's format), ``<prefix>.meta.json``, ``<prefix>.labels.jsonl`` (the
per-segment label sidecar) and ``<prefix>.tokenizer/``. Everything is written under temporary
names and renamed at the end, ``meta.json`` last: a dataset whose ``meta.json`` exists is
complete. See docs/data.md for every key of ``meta.json`` and of the sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from megatron_srp.data.indexed import write_index
from megatron_srp.data.shard_worker import shard_name

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
# keys of meta.json that describe how a run went, not what it computed
VOLATILE_META_KEYS = ("created_utc", "seconds", "docs_per_second", "workers", "backend",
                      "shards_resumed")


def dataset_paths(prefix: str | Path) -> dict[str, Path]:
    """The files one dataset occupies: ``bin``, ``idx``, ``meta``, ``labels``, ``tokenizer``."""
    prefix = str(prefix)
    return {
        "bin": Path(prefix + ".bin"),
        "idx": Path(prefix + ".idx"),
        "meta": Path(prefix + ".meta.json"),
        "labels": Path(prefix + ".labels.jsonl"),
        "tokenizer": Path(prefix + ".tokenizer"),
    }


def merge_variant(work_dir: Path, variant: str, shards: Sequence[int], dtype: type,
                  temp: dict[str, Path], with_labels: bool) -> None:
    """Concatenate a variant's shards, in shard order, into ``temp``'s bin/idx (and labels,
    whose shard-local document numbers become dataset-wide)."""
    lengths, offset = [], 0
    labels = open(temp["labels"], "w", encoding="utf-8") if with_labels else None
    try:
        with open(temp["bin"], "wb") as data:
            for index in shards:
                prefix = work_dir / variant / shard_name(index)
                lengths.append(np.load(f"{prefix}.lengths.npy"))
                with open(f"{prefix}.bin", "rb") as shard_bin:
                    shutil.copyfileobj(shard_bin, data, 1 << 22)
                if labels is not None:
                    _append_labels(Path(f"{prefix}.labels.jsonl"), offset, labels)
                offset += len(lengths[-1])
    finally:
        if labels is not None:
            labels.close()
    sequence_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    write_index(temp["idx"], dtype, sequence_lengths, np.arange(len(sequence_lengths) + 1))


def _append_labels(shard_labels: Path, offset: int, out: Any) -> None:
    """A shard's sidecar with ``dataset_doc`` shifted by ``offset`` (the lines are otherwise
    what the shard wrote, ``json.dumps`` formatting: only that number is rewritten)."""
    with open(shard_labels, encoding="utf-8") as f:
        if offset == 0:
            shutil.copyfileobj(f, out, 1 << 22)
            return
        # The key is unambiguous: a quote inside the JSON-escaped doc_id is preceded by "\\".
        while lines := f.readlines(1 << 22):
            out.write(_DATASET_DOC.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset},",
                                       "".join(lines)))


_DATASET_DOC = re.compile(r'(, "dataset_doc": )(\d+),')


def config_hash(meta: dict[str, Any]) -> str:
    """Identity of what was computed: tokenizer, reader options, stages, intervention and inputs
    (path, size). Timings, worker count and creation time are left out."""
    keyed = {
        "format_version": meta["format_version"],
        "tokenizer": meta["tokenizer"]["fingerprint"],
        "reader": meta["reader"],
        "stages": meta["stages"],
        "intervention": meta.get("intervention"),
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


def publish(temp: dict[str, Path], final: dict[str, Path], keys: Iterable[str]) -> None:
    """Move finished files into place. Call with the data files first and ``meta`` last, so no
    moment exists where a meta.json sits beside files it does not describe."""
    for key in keys:
        if key not in temp or not temp[key].exists():
            continue
        if final[key].is_dir():
            shutil.rmtree(final[key])
        os.replace(temp[key], final[key])


def remove(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def markdown_summary(summary: dict[str, Any]) -> str:
    """The run's summary as Markdown: input counts, labels, and one row per variant."""
    lines = [
        f"documents read: {summary['documents_read']}, rejected: {summary['rejected']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(summary['reject_reasons'].items()))})"
           if summary["reject_reasons"] else "")
        + f", empty after stages: {summary['empty_after_stages']}",
    ]
    if summary["segments"]:
        unsafe = summary["unsafe_segments"]
        lines.append(f"segments: {summary['segments']} ({unsafe} unsafe, "
                     f"{100 * unsafe / summary['segments']:.1f}%), input tokens: "
                     f"{summary['source_tokens']}")
        if summary.get("unparsed_labels"):
            lines.append(f"judge replies without a verdict: {summary['unparsed_labels']} "
                         "(labelled by the classifier's on_unparseable policy)")
        if summary["categories"]:
            lines.append("unsafe segments by category: " + ", ".join(
                f"{k}: {v}" for k, v in sorted(summary["categories"].items())))
    lines += ["", "| variant | intervention | documents | tokens | added tokens per 100 input "
              "| docs without output |", "|---|---|---:|---:|---:|---:|"]
    for name, v in summary["variants"].items():
        added = v.get("added_tokens_per_100_input")
        lines.append(f"| {name} | {v['intervention']} | {v['documents']} | {v['tokens']} | "
                     f"{'n/a' if added is None else f'{added:.2f}'} | "
                     f"{v['documents_without_output']} |")
    return "\n".join(lines) + "\n"
