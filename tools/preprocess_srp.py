"""Corpus (JSONL, Parquet, text) -> Megatron indexed datasets, one per variant.

Plain tokenization:   --input X --output-prefix data/plain
SRP and baselines:    --input X --output-dir data/srp --variants raw,filter,rewrite,tag,srp
Each segment is classified once, whatever the number of variants. See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from megatron_srp import cli
from megatron_srp.data.readers import DEFAULT_MAX_CHARS, TEXT_SPLITS, InputError
from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="input file or glob (.jsonl[.gz], .parquet, .txt, ...); repeatable")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-dir", help="one dataset per variant: <dir>/<variant>.bin/.idx/"
                     ".meta.json/.labels.jsonl, plus summary.json/.md and rejects.jsonl")
    out.add_argument("--output-prefix", help="a single dataset (one variant, default raw)")
    p.add_argument("--variants", default="raw",
                   help="comma-separated variants: raw, filter, rewrite, tag, srp (= reflect), "
                        "refusal (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar="SPEC",
                   help="a variant with options, NAME[=INTERVENTION][:key=value,...], e.g. "
                        "'srp-end=reflect:every_segment=false' or 'tag:p=0.1'; repeatable")
    p.add_argument("--classifier", default=None,
                   help="oracle, embedded, hf, llm-judge (default: embedded when a variant "
                        "needs labels, none for raw only)")
    p.add_argument("--classifier-option", action="append", default=[], metavar="KEY=VALUE",
                   help="classifier option, e.g. threshold=0.6 or label_key=harmful; repeatable")
    p.add_argument("--segment-tokens", type=int, default=256,
                   help="target segment length in tokens (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=default_tokenizer_dir(),
                   help="tokenizer directory with tokenizer.json (default: the shipped one)")
    p.add_argument("--json-key", default="text",
                   help="JSONL key / Parquet column holding the text (default: %(default)s)")
    p.add_argument("--id-key", default=None,
                   help="record key holding a document id; duplicates are rejected")
    p.add_argument("--text-split", choices=TEXT_SPLITS, default="blank-lines",
                   help="how plain text files are cut into documents (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help="longer documents are rejected (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes or Ray actors (default: CPU count, %(default)s)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local processes or a Ray cluster (default: %(default)s)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--shard-mb", type=float, default=4.0,
                   help="input megabytes per shard, the unit of work and of resuming "
                        "(default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--max-reject-fraction", type=float, default=0.01,
                   help="fail when more of the records are rejected (default: %(default)s)")
    p.add_argument("--keep-special-tokens", action="store_true",
                   help="do not strip literal special-token strings from the input text")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the per-shard files after a successful run")
    p.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    cli.add_common_args(p, example="workers",
                        json_help="append the run's summary (summary.json) as one JSON line "
                                  "to FILE")
    return p


@cli.tool_main
def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    # Imported here, not at the top: spawned workers re-import this script, and the
    # preprocess module pulls in Megatron-Core, which takes seconds to import.
    from megatron_srp.data.preprocess import (PreprocessConfig, PreprocessError, ShardFailed,
                                              run_preprocess)
    from megatron_srp.data.shards import ReaderOptions
    from megatron_srp.data.variants import VariantSpec, parse_variants
    from megatron_srp.reflection.segment import SegmentConfig

    try:
        variants = parse_variants(args.variants) + [VariantSpec.parse(v) for v in args.variant]
        if args.variant and args.variants == "raw":
            variants = variants[1:]  # --variant alone replaces the default
        options = {}
        for item in args.classifier_option:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--classifier-option {item!r} is not KEY=VALUE")
            options[key.strip()] = yaml.safe_load(value)
        config = PreprocessConfig(
            inputs=args.input, output_dir=args.output_dir, output_prefix=args.output_prefix,
            variants=variants,
            reader=ReaderOptions(args.json_key, args.text_split, args.id_key, args.max_chars),
            strip_special_tokens=not args.keep_special_tokens,
            segment=SegmentConfig(segment_tokens=args.segment_tokens),
            classifier=args.classifier, classifier_options=options, workers=args.workers,
            backend=args.backend, ray_address=args.ray_address,
            shard_bytes=max(1, int(args.shard_mb * (1 << 20))), strict=args.strict,
            max_reject_fraction=args.max_reject_fraction, overwrite=args.overwrite,
            keep_work=args.keep_work, progress=cli.progress_wanted(args))
        result = run_preprocess(config, SRPTokenizer.from_dir(args.tokenizer))
    except (InputError, FileExistsError, ValueError, PreprocessError, ShardFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = result.summary
    print(result.layout.summary_md.read_text(encoding="utf-8"), end="")
    print(f"{summary['documents_read']} documents in {summary['seconds']:.1f}s "
          f"({summary['documents_read'] / max(summary['seconds'], 1e-9):.0f} docs/s, "
          f"{summary['shards']} shards, {summary['shards_resumed']} resumed) -> "
          + ", ".join(str(p) for p in result.layout.prefixes.values())
          + f"; summary {result.layout.summary}, rejects {result.layout.rejects}")
    if args.json:
        cli.append_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
