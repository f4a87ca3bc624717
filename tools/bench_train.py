"""Benchmark training throughput: tokens/s, TFLOP/s per device, MFU and peak memory.

    torchrun --nproc_per_node=N tools/bench_train.py --config FILE [key=value ...]
    python tools/bench_train.py model.preset=tiny train.seq_length=256        # one CPU process

Runs the real training step on random tokens (no dataset needed). Prints a Markdown table row
and, with --json, appends one JSON object per run to a file.
"""
import argparse
import json
import sys

from megatron_srp.config import ConfigError, load_config
from megatron_srp.bench.train import as_markdown_row, benchmark, to_dict
from megatron_srp.units import json_safe

HEADER = ("| preset | layout | precision | recompute | seq | GBS/MBS | tokens/s | TFLOP/s/dev | "
          "MFU | peak mem GB | device |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (optional; the defaults are the tiny preset)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--vocab-size", type=int, help="default: the preset's vocabulary")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak dense bf16 TFLOP/s per device for MFU (default: from the "
                             "device name; none on CPU)")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model.preset=smollm2-1.7b")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = benchmark(cfg, args.warmup, args.steps, args.vocab_size, args.peak_tflops)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(HEADER)
        print(as_markdown_row(result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(json_safe(to_dict(result)), allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
