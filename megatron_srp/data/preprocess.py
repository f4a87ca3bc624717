"""Corpus -> one Megatron indexed dataset per variant, classifying each segment only once.

``run_preprocess(config)`` scans the inputs into shards (:mod:`shards`), has workers process
them (:mod:`shard_worker`; local processes or Ray actors), then merges each variant's shards in
shard order and publishes the datasets (:mod:`outputs`). Shards are cut independently of the
worker count and written in a fixed order, so the output is byte-identical for any number of
workers and either backend. Finished shards are kept in a work directory until the run
completes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

import megatron_srp
from megatron_srp.data.indexed import optimal_dtype
from megatron_srp.data.labeling import Labeler
from megatron_srp.data.outputs import (
    META_FORMAT_VERSION,
    META_KIND,
    config_hash,
    dataset_paths,
    markdown_summary,
    merge_variant,
    publish,
    read_dataset_meta,
    remove,
)
from megatron_srp.data.readers import check_text_split, expand_inputs, input_format
from megatron_srp.data.shard_worker import (
    ShardFailed,
    ShardProcessor,
    Variant,
    done_path,
    init_worker,
    run_worker_shard,
)
from megatron_srp.data.shards import DEFAULT_SHARD_BYTES, ReaderOptions, ShardSpec, scan_shards
from megatron_srp.data.variants import VariantSpec, build_variants
from megatron_srp.documents import Stage, default_stages, describe_stages
from megatron_srp.reflection.segment import SegmentConfig
from megatron_srp.tokenizer import SRPTokenizer
from megatron_srp.units import read_json, stamp, write_atomic

BACKENDS = ("local", "ray")
__all__ = ["PreprocessConfig", "PreprocessError", "RunResult", "ShardFailed", "run_preprocess",
           "preprocess", "dataset_paths", "read_dataset_meta", "config_hash"]


class PreprocessError(RuntimeError):
    """The run could not finish (too many rejects, a foreign work directory, ...)."""


@dataclass
class PreprocessConfig:
    """One preprocessing run. Give ``output_dir`` (each variant at ``<dir>/<variant>``) or
    ``output_prefix`` (exactly one variant, written at that prefix)."""

    inputs: list[str]
    output_dir: Optional[str] = None
    output_prefix: Optional[str] = None
    variants: list[VariantSpec] = field(default_factory=lambda: [VariantSpec("raw")])
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    strip_special_tokens: bool = True
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    classifier: Optional[str] = None  # None: "embedded" when a variant needs labels
    classifier_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    backend: str = "local"
    ray_address: Optional[str] = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    strict: bool = False
    max_reject_fraction: float = 0.01
    overwrite: bool = False
    keep_work: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.output_dir is None) == (self.output_prefix is None):
            raise ValueError("give exactly one of output_dir and output_prefix")
        if self.output_prefix is not None and len(self.variants) != 1:
            raise ValueError("output_prefix takes exactly one variant; use output_dir for several")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got "
                             f"{self.max_reject_fraction}")
        check_text_split(self.reader.text_split)
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"variant names must be given and unique, got {names}")


@dataclass
class RunLayout:
    """Where a run's files go."""

    prefixes: dict[str, Path]
    summary: Path
    summary_md: Path
    rejects: Path
    work_dir: Path

    @classmethod
    def of(cls, config: PreprocessConfig) -> RunLayout:
        if config.output_prefix is not None:
            prefix = Path(config.output_prefix)
            if prefix.name.endswith((".bin", ".idx", ".meta.json")) or not prefix.name:
                raise ValueError(f"output prefix {config.output_prefix!r} must be a path "
                                 "without extension")
            base = str(prefix)
            return cls({config.variants[0].name: prefix}, Path(base + ".summary.json"),
                       Path(base + ".summary.md"), Path(base + ".rejects.jsonl"),
                       Path(base + ".work"))
        out = Path(config.output_dir)
        return cls({v.name: out / v.name for v in config.variants}, out / "summary.json",
                   out / "summary.md", out / "rejects.jsonl", out / ".work")


@dataclass
class RunResult:
    """What the run wrote; ``summary`` is the content of summary.json."""

    layout: RunLayout
    summary: dict[str, Any]
    metas: dict[str, dict[str, Any]]

    @property
    def seconds(self) -> float:
        return self.summary["seconds"]

    # The single-variant view (output_prefix runs): that variant's meta, files and counts.
    @property
    def meta(self) -> dict[str, Any]:
        if len(self.metas) != 1:
            raise AttributeError(f"the run wrote {len(self.metas)} variants; use metas[name]")
        return next(iter(self.metas.values()))

    @property
    def paths(self) -> dict[str, Path]:
        return dataset_paths(self.layout.prefixes[self.meta["variant"]])

    @property
    def documents_in(self) -> int:
        return self.meta["counts"]["input_documents"]

    @property
    def documents(self) -> int:
        return self.meta["counts"]["documents"]

    @property
    def tokens(self) -> int:
        return self.meta["counts"]["tokens"]


def run_preprocess(config: PreprocessConfig, tokenizer: SRPTokenizer,
                   stages: Sequence[Stage] | None = None,
                   variants: Sequence[Variant] | None = None) -> RunResult:
    """Run ``config``. ``stages`` (library use) replace the default special-token stripping;
    ``variants`` (library use) are built :class:`Variant` objects overriding ``config.variants``.
    """
    layout = RunLayout.of(config)
    _refuse_existing(layout, config.overwrite)
    stages = list(stages) if stages is not None else (
        default_stages(tokenizer) if config.strip_special_tokens else [])
    variants = tuple(variants) if variants is not None else build_variants(config.variants)
    labeler = Labeler(_classifier(config, variants), config.segment, tokenizer)
    paths = expand_inputs(config.inputs)
    specs = scan_shards(paths, config.reader, config.shard_bytes)
    dtype = optimal_dtype(tokenizer.vocab_size)
    processor = ShardProcessor(tokenizer, config.reader, tuple(stages), labeler, variants,
                               np.dtype(dtype).name, str(layout.work_dir), config.strict)
    describe = _describe(config, tokenizer, stages, labeler, variants, paths)
    started = time.perf_counter()
    results, resumed = _prepare_work_dir(layout.work_dir, describe, specs)
    todo = [s for s in specs if s.index not in results]
    with tqdm(total=sum(s.size for s in specs), initial=sum(s.size for s in specs
              if s.index in results), desc="preprocess", unit="B", unit_scale=True,
              disable=None if config.progress else True) as bar:
        for spec, result in _execute(config, processor, todo):
            results[spec.index] = result
            bar.update(spec.size)
    totals = _totals([results[s.index] for s in specs])
    _write_rejects(layout, specs)
    _check_rejects(config, layout, totals)
    metas = _merge_and_publish(layout, specs, variants, labeler, dtype, tokenizer, describe,
                               totals, time.perf_counter() - started, config, resumed)
    summary = _summary(config, describe, totals, metas, time.perf_counter() - started, resumed,
                       [results[s.index] for s in specs])
    write_atomic(layout.summary_md, markdown_summary(summary))
    write_atomic(layout.summary, json.dumps(summary, indent=2) + "\n")
    if not config.keep_work:
        shutil.rmtree(layout.work_dir, ignore_errors=True)
    return RunResult(layout, summary, metas)


def _classifier(config: PreprocessConfig, variants: Sequence[Variant]) -> Any:
    from megatron_srp.reflection.classifiers import build_classifier

    needs_labels = [v.name for v in variants if v.intervention.name != "raw"]
    name = config.classifier
    if name is None and not needs_labels:
        return None
    return build_classifier(name or "embedded", **config.classifier_options)


def _refuse_existing(layout: RunLayout, overwrite: bool) -> None:
    existing = [str(p) for prefix in layout.prefixes.values()
                for p in dataset_paths(prefix).values() if p.exists()]
    if layout.summary.exists():
        existing.append(str(layout.summary))
    if existing and not overwrite:
        raise FileExistsError(f"output exists (pass overwrite=True / --overwrite to replace): "
                              f"{', '.join(existing)}")


def _describe(config: PreprocessConfig, tokenizer: SRPTokenizer, stages: Sequence[Stage],
              labeler: Labeler, variants: Sequence[Variant], paths: Sequence[Path]
              ) -> dict[str, Any]:
    """Everything that decides the output; its hash names the work directory's contents."""
    return {
        "tokenizer": tokenizer.fingerprint,
        "reader": asdict(config.reader),
        "stages": describe_stages(stages) + labeler.describe(),
        "variants": {v.name: v.intervention.describe() for v in variants},
        "shard_bytes": config.shard_bytes,
        "strict": config.strict,
        "inputs": [{"path": str(p.resolve()), "format": input_format(p),
                    "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths],
    }


def _prepare_work_dir(work_dir: Path, describe: dict[str, Any], specs: Sequence[ShardSpec]
                      ) -> tuple[dict[int, dict[str, Any]], int]:
    """Results of the shards an earlier run of the same configuration finished."""
    run_hash = stamp(describe)  # the shards' stamp: configuration, inputs, tokenizer
    run_file = work_dir / "run.json"
    if run_file.is_file():
        previous = read_json(run_file) or {}
        if previous.get("run_hash") != run_hash:
            shutil.rmtree(work_dir)  # another configuration or changed inputs: start afresh
    work_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_file, {"run_hash": run_hash, "shards": len(specs)})
    results = {}
    for spec in specs:
        path = done_path(work_dir, spec.index)
        if path.is_file():
            results[spec.index] = json.loads(path.read_text(encoding="utf-8"))
    return results, len(results)


def _execute(config: PreprocessConfig, processor: ShardProcessor, todo: Sequence[ShardSpec]
             ) -> Iterator[tuple[ShardSpec, dict[str, Any]]]:
    """(shard, its counts) as shards finish, in any order."""
    if config.backend == "ray":
        from megatron_srp.data.ray_backend import run_shards_on_ray

        yield from run_shards_on_ray(processor, todo, config.workers, config.ray_address)
    elif config.workers == 1 or len(todo) <= 1:
        if config.workers == 1:  # one worker, one core: no tokenizer thread pool either
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for spec in todo:
            yield spec, processor(spec)
    else:
        yield from _run_in_processes(processor, todo, config.workers)


def _run_in_processes(processor: ShardProcessor, todo: Sequence[ShardSpec], workers: int
                      ) -> Iterator[tuple[ShardSpec, dict[str, Any]]]:
    # spawn: fork is unsafe once torch threads exist. ProcessPoolExecutor rather than Pool: on
    # an error Pool.terminate() can kill a worker holding the queue lock and deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                             initializer=init_worker, initargs=(processor,)) as executor:
        futures = {executor.submit(run_worker_shard, spec): spec for spec in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    yield futures[future], future.result()
        finally:
            for future in pending:
                future.cancel()


def _totals(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    totals: Counter = Counter()
    reasons: Counter = Counter()
    categories: Counter = Counter()
    variants: dict[str, Counter] = {}
    for r in results:
        for key, value in r.items():
            if isinstance(value, int) and key not in ("shard", "start", "end"):
                totals[key] += value
        reasons.update(r["reject_reasons"])
        categories.update(r["categories"])
        for name, counts in r["variants"].items():
            variants.setdefault(name, Counter()).update(counts)
    return {**totals, "reject_reasons": dict(reasons), "categories": dict(categories),
            "variants": {k: dict(v) for k, v in variants.items()}}


def _write_rejects(layout: RunLayout, specs: Sequence[ShardSpec]) -> None:
    temp = layout.rejects.with_name(layout.rejects.name + ".partial")
    with open(temp, "w", encoding="utf-8") as out:
        for spec in specs:
            shard_file = layout.work_dir / "rejects" / f"shard-{spec.index:06d}.jsonl"
            with open(shard_file, encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
    temp.replace(layout.rejects)


def _check_rejects(config: PreprocessConfig, layout: RunLayout, totals: dict[str, Any]) -> None:
    rejected = totals.get("rejected", 0)
    records = totals.get("documents_read", 0) + rejected
    if records and rejected / records > config.max_reject_fraction:
        first = layout.rejects.open(encoding="utf-8").readline()
        where = json.loads(first) if first else {}
        raise PreprocessError(
            f"{rejected} of {records} input records were rejected ({100 * rejected / records:.2f}%"
            f" > max_reject_fraction {100 * config.max_reject_fraction:.2f}%); nothing was "
            f"published. Reasons: {totals['reject_reasons']}. First: {where.get('file')}:"
            f"{where.get('line') or where.get('row')}: {where.get('reason')}. All are listed in "
            f"{layout.rejects}; fix the input or raise --max-reject-fraction, and rerun (finished "
            f"shards are kept in {layout.work_dir}).")


def _merge_and_publish(layout: RunLayout, specs: Sequence[ShardSpec],
                       variants: Sequence[Variant], labeler: Labeler, dtype: type,
                       tokenizer: SRPTokenizer, describe: dict[str, Any], totals: dict[str, Any],
                       seconds: float, config: PreprocessConfig, resumed: int
                       ) -> dict[str, dict[str, Any]]:
    """Merge every variant, then publish: all data files first, every meta.json last."""
    with_labels = labeler.classifier is not None
    shards = [s.index for s in specs]
    temps, metas = {}, {}
    try:
        for variant in variants:
            final = dataset_paths(layout.prefixes[variant.name])
            final["bin"].parent.mkdir(parents=True, exist_ok=True)
            temp = dataset_paths(f"{layout.prefixes[variant.name]}.partial")
            temps[variant.name] = temp
            merge_variant(layout.work_dir, variant.name, shards, dtype, temp, with_labels)
            tokenizer.save(temp["tokenizer"])
            metas[variant.name] = _variant_meta(variant, describe, tokenizer, dtype, totals,
                                                seconds, config, resumed, final, with_labels)
            temp["meta"].write_text(json.dumps(metas[variant.name], indent=2) + "\n",
                                    encoding="utf-8")
        for name, temp in temps.items():
            final = dataset_paths(layout.prefixes[name])
            final["meta"].unlink(missing_ok=True)
            publish(temp, final, ("tokenizer", "bin", "idx", "labels"))
        for name, temp in temps.items():
            publish(temp, dataset_paths(layout.prefixes[name]), ("meta",))
    finally:
        for temp in temps.values():
            remove(p for p in temp.values() if p.exists())
    return metas


def _variant_meta(variant: Variant, describe: dict[str, Any], tokenizer: SRPTokenizer,
                  dtype: type, totals: dict[str, Any], seconds: float, config: PreprocessConfig,
                  resumed: int, final: dict[str, Path], with_labels: bool) -> dict[str, Any]:
    """The content of one variant's ``meta.json`` (docs/data.md explains each key)."""
    counts = totals["variants"].get(variant.name, {})
    meta: dict[str, Any] = {
        "format_version": META_FORMAT_VERSION,
        "kind": META_KIND,
        "megatron_srp_version": megatron_srp.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": "",
        "variant": variant.name,
        "tokenizer": {
            "name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "pad": tokenizer.pad,
            "special_tokens": dict(tokenizer.special_token_ids),
        },
        "dtype": np.dtype(dtype).name,
        "reader": describe["reader"],
        "stages": describe["stages"],
        "classifier": describe["stages"][-1]["classifier"] if with_labels else None,
        "intervention": describe["variants"][variant.name],
        "inputs": [{k: i[k] for k in ("path", "format", "bytes")} for i in describe["inputs"]],
        "counts": {
            "input_documents": totals.get("documents_read", 0),
            "rejected": totals.get("rejected", 0),
            "empty_documents_dropped": totals.get("empty_after_stages", 0),
            "documents": counts.get("documents", 0),
            "tokens": counts.get("tokens", 0),
            "documents_without_output": counts.get("documents_without_output", 0),
            "segments": totals.get("segments", 0),
            "unsafe_segments": totals.get("unsafe_segments", 0),
            "unparsed_labels": totals.get("unparsed_labels", 0),
            "segments_placed": counts.get("segments_placed", 0),
        },
        "categories": totals["categories"],
        "seconds": round(seconds, 3),
        "docs_per_second": round(totals.get("documents_read", 0) / seconds, 1) if seconds else None,
        "workers": config.workers,
        "backend": config.backend,
        "shards_resumed": resumed,
        "files": {key: final[key].name for key in ("bin", "idx", "tokenizer")}
        | {"labels": final["labels"].name if with_labels else None},
    }
    meta["config_hash"] = config_hash(meta)
    return meta


def _summary(config: PreprocessConfig, describe: dict[str, Any], totals: dict[str, Any],
             metas: dict[str, dict[str, Any]], seconds: float, resumed: int,
             shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: the run's counts, per variant what it wrote, and per shard (in shard
    order) the node that ran it and the GPU ids Ray gave its actor."""
    source_tokens = totals.get("source_tokens", 0)
    variants = {}
    for name, meta in metas.items():
        c = meta["counts"]
        added = (100 * (c["tokens"] - c["documents"] - source_tokens) / source_tokens
                 if source_tokens and meta["intervention"]["name"] != "refusal" else None)
        variants[name] = {"intervention": meta["intervention"]["name"],
                          "documents": c["documents"], "tokens": c["tokens"],
                          "documents_without_output": c["documents_without_output"],
                          "segments_placed": c["segments_placed"],
                          "added_tokens_per_100_input": None if added is None else round(added, 4),
                          "config_hash": meta["config_hash"]}
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3), "workers": config.workers, "backend": config.backend,
        "shards": len(shards), "shards_resumed": resumed,
        "inputs": [i["path"] for i in describe["inputs"]],
        "documents_read": totals.get("documents_read", 0),
        "rejected": totals.get("rejected", 0), "reject_reasons": totals["reject_reasons"],
        "empty_after_stages": totals.get("empty_after_stages", 0),
        "segments": totals.get("segments", 0),
        "unsafe_segments": totals.get("unsafe_segments", 0),
        "unparsed_labels": totals.get("unparsed_labels", 0),
        "source_tokens": source_tokens, "categories": totals["categories"],
        "variants": variants,
        "shard_nodes": [r.get("node") for r in shards],
        "shard_gpus": [r.get("gpus", []) for r in shards],
    }


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path,
               tokenizer: SRPTokenizer, stages: Sequence[Stage] | None = None,
               workers: int = 1, *, text_key: str = "text", text_split: str = "blank-lines",
               overwrite: bool = False, progress: bool = True, strict: bool = True,
               **options: Any) -> RunResult:
    """Tokenize ``inputs`` (paths or globs) into one plain dataset at ``output_prefix``.

    The single-variant (``raw``, no classifier) case of :func:`run_preprocess`; strict by
    default, so a bad record raises :class:`InputError` naming its file and line.
    """
    config = PreprocessConfig(
        [str(i) for i in inputs], output_prefix=str(output_prefix),
        reader=ReaderOptions(text_key=text_key, text_split=text_split), workers=workers,
        overwrite=overwrite, progress=progress, strict=strict, **options)
    return run_preprocess(config, tokenizer, stages=stages)
