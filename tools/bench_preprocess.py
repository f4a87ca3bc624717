"""Benchmark preprocessing: wall time, CPU time and peak memory of tools/preprocess_srp.py
(raw, and srp with the embedded classifier; local processes or Ray) against bare
``encode_batch`` tokenization and Megatron-LM's tools/preprocess_data.py on the same corpus,
tokenizer and worker count.

    python tools/bench_preprocess.py --corpus-mb 40 --workers 1,2 --scaling-mb 40 \\
        --tokenizers shipped,bpe-49152 --megatron-lm /path/to/Megatron-LM \\
        --work-dir /tmp/srp_bench_preprocess

Builds (or reuses) a JSONL corpus from the shared data, runs each case as a subprocess, prints
one Markdown table and writes report.json and report.md. docs/bench_preprocess_method.md
describes the method.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from megatron_srp import cli
from megatron_srp.bench.preprocess import (
    BPE_49K,
    CASES,
    SCALING_CASES,
    build_corpus,
    markdown_report,
    run_bench,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@cli.tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=50,
                        help="size of the main corpus in MiB (default: %(default)s)")
    parser.add_argument("--workers", type=_ints, default=[1, 2],
                        help="comma-separated worker counts (default: 1,2)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per case; the report gives medians (default: %(default)s)")
    parser.add_argument("--scaling-mb", type=float,
                        help="also measure at S and 10*S MiB (once each) and compare peak "
                             "memory; S or 10*S equal to --corpus-mb reuses the main runs")
    parser.add_argument("--scaling-cases", type=_names, default=list(SCALING_CASES),
                        help="cases measured at the scaling sizes (default: %(default)s)")
    parser.add_argument("--scaling-workers", type=_ints,
                        help="worker counts measured at the scaling sizes (default: the "
                             "largest of --workers)")
    parser.add_argument("--tokenizers", type=_names, default=["shipped"],
                        help=f"comma-separated: shipped, {BPE_49K} (a 49,152-entry byte-level "
                             "BPE trained on the shared data into the work dir when absent) or "
                             "tokenizer directories; the whole table runs for each (default: "
                             "shipped)")
    parser.add_argument("--megatron-lm",
                        help="Megatron-LM checkout (its tools/preprocess_data.py is run with "
                             "PYTHONPATH set to it); without it that case is skipped")
    parser.add_argument("--megatron-python",
                        help="python for Megatron-LM (needs transformers, six, triton; default: "
                             "this python)")
    parser.add_argument("--data-dir", help="shared data (default: $SRP_SHARED_DATA or "
                                           "<repo>/../shared/data)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(),
                                                           "srp_bench_preprocess"),
                        help="corpora, outputs and logs (default: %(default)s)")
    parser.add_argument("--report", help="report JSON path; the .md goes next to it "
                                         "(default: <work-dir>/report.json)")
    parser.add_argument("--ours-tool", help="our preprocessing CLI (default: "
                                            "tools/preprocess_srp.py of this checkout)")
    parser.add_argument("--ours-args", default="",
                        help="extra arguments for tools/preprocess_srp.py, one shell string")
    parser.add_argument("--pss-every", type=int, default=10,
                        help="sample PSS (reads smaps; dearer than RSS) at every N-th 50 ms poll;"
                             " 0: never (default: %(default)s)")
    parser.add_argument("--flat-tolerance", type=float, default=1.25,
                        help="peak RSS ratio (10x corpus / 1x) still counted flat "
                             "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, help="kill a run after this many seconds")
    parser.add_argument("--corpus-only", action="store_true",
                        help="build the corpus (--corpus-mb) and stop")
    cli.add_common_args(parser, example="corpus_mb",
                        json_help="append the figures (report.json's content) as one JSON line "
                                  "to FILE")
    args = cli.parse_args(parser, argv)

    if args.corpus_only:
        path = Path(args.work_dir) / f"corpus-{args.corpus_mb:g}MB.jsonl"
        record = build_corpus(path, args.corpus_mb, args.data_dir)
        print(f"{path}: {record['documents']} documents, {record['bytes']} bytes")
        return 0
    try:
        report = run_bench(
            args.work_dir, args.corpus_mb, args.workers,
            _names(args.cases), args.repeats, args.scaling_mb, args.megatron_lm,
            args.megatron_python, None, args.data_dir, shlex.split(args.ours_args),
            args.pss_every, args.flat_tolerance, args.timeout, args.report, args.ours_tool,
            args.tokenizers, args.scaling_cases, args.scaling_workers)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_report(report))
    if args.json:
        cli.append_json(args.json, report)
    report_path = Path(args.report or Path(args.work_dir) / "report.json")
    print(f"wrote {report_path} and {report_path.with_suffix('.md')}")
    return 1 if any(r["returncode"] != 0 for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
