"""Curriculum dataset costs: index build time and memory at a pretraining budget (sizes only),
and per-sample fetch time against a plain Megatron BlendedDataset on real data.

    python tools/bench_curriculum.py                                   # 600B tokens at 2048
    python tools/bench_curriculum.py --budget-tokens 2e9 --skip-fetch  # quick look
    python tools/bench_curriculum.py --report /tmp/bench_curriculum.json
    python tools/bench_curriculum.py --skip-fetch \\
        --curriculum '[{until: 0.5, blend: {a: 1.0}}, {until: 1.0, blend: {a: 0.5, b: 0.5}}]'

See megatron_srp/bench/curriculum.py for what is measured, docs/benchmarks.md for results.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from megatron_srp import cli
from megatron_srp.config import ConfigError
from megatron_srp.bench.curriculum import (
    DEFAULT_PHASES, fetch_overhead, index_at_scale, log, markdown, parse_curriculum,
)
from megatron_srp.bench.preprocess import machine_info

REPO = Path(__file__).resolve().parent.parent


@cli.tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-tokens", type=float, default=600e9,
                        help="train token budget for the index build (default: %(default)g)")
    parser.add_argument("--seq-length", type=int, default=2048, help="default: %(default)s")
    curriculum = parser.add_argument(
        "--curriculum",
        help="phases for the index build, written as data.curriculum in a config (default: "
             "0.2 {safe}; 0.6 {safe 0.7, reflect 0.3}; 1.0 {safe 0.5, reflect 0.3, refusal 0.2})")
    parser.add_argument("--fetch-samples", type=int, default=20_000,
                        help="samples read per pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="fetch passes (default: %(default)s)")
    parser.add_argument("--order", choices=("random", "sequential"), default="random",
                        help="order of the fetched indices (default: %(default)s)")
    parser.add_argument("--skip-index", action="store_true", help="only the fetch comparison")
    parser.add_argument("--skip-fetch", action="store_true", help="only the index build")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("SRP_SHARED_DATA",
                                                    REPO.parent / "shared" / "data")),
                        help="shared data for the fetch comparison (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "srp_bench_curriculum",
                        help="preprocessed corpora go here (default: %(default)s)")
    parser.add_argument("--report", type=Path, help="write JSON here and Markdown beside it")
    curriculum.yaml_text = True  # in --config a list of phases, not a string
    cli.add_common_args(parser, example="budget_tokens",
                        json_help="append the figures (--report's JSON) as one JSON line to "
                                  "FILE")
    args = cli.parse_args(parser, argv)
    try:
        phases = parse_curriculum(args.curriculum) if args.curriculum else DEFAULT_PHASES
    except ConfigError as exc:
        parser.error(f"--curriculum: {exc}")

    machine = machine_info(None)
    index = fetch = None
    start = time.perf_counter()
    if not args.skip_index:
        log(f"index build for {args.budget_tokens:.3g} tokens at sequence length "
            f"{args.seq_length} ...")
        index = index_at_scale(args.budget_tokens, args.seq_length, phases)
    if not args.skip_fetch:
        log(f"fetch timing: {args.fetch_samples:,} {args.order} indices x {args.repeats} "
            "passes ...")
        args.work_dir.mkdir(parents=True, exist_ok=True)
        fetch = fetch_overhead(args.data_dir, args.work_dir, args.fetch_samples, args.repeats,
                               args.seq_length, args.order)
    machine["benchmark_seconds"] = round(time.perf_counter() - start, 1)
    header = (f"{machine['cpu_model']}, {machine['cpu_count']} CPUs, {machine['memory_gb']} GB; "
              f"Python {machine['python']}, torch {machine['torch']}, megatron-core "
              f"{machine['megatron-core']}; commit {machine['git_commit']}"
              f"{' with uncommitted changes' if machine['git_dirty'] else ''}; "
              f"{machine['date_utc']}; the benchmark took {machine['benchmark_seconds']} s.")
    text = markdown(index, fetch, header)
    print(text)
    if args.json:
        cli.append_json(args.json, {"machine": machine, "index": index, "fetch": fetch})
    if args.report:
        from megatron_srp.units import write_atomic
        write_atomic(args.report, json.dumps({"machine": machine, "index": index,
                                              "fetch": fetch}, indent=2) + "\n")
        write_atomic(args.report.with_suffix(".md"), text + "\n")
        log(f"wrote {args.report} and {args.report.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
