"""Benchmark training throughput: tokens/s, TFLOP/s per device, MFU and peak memory.

    torchrun --nproc_per_node=N tools/bench_train.py --config FILE [key=value ...]
    python tools/bench_train.py model.preset=tiny train.seq_length=256        # one CPU process

Runs the real training step on random tokens (no dataset needed). Prints a Markdown table row
and, with --json, appends one JSON object per run to a file.
"""
import argparse
import sys

from megatron_srp import cli
from megatron_srp.config import load_config
from megatron_srp.bench.train import as_markdown_row, benchmark, to_dict

HEADER = ("| preset | layout | precision | recompute | seq | GBS/MBS | tokens/s | TFLOP/s/dev | "
          "MFU | peak mem GB | device |\n|---|---|---|---|---|---|---|---|---|---|---|")


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--vocab-size", type=int, help="default: the preset's vocabulary")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak dense bf16 TFLOP/s per device for MFU (default: from the "
                             "device name; none on CPU)")
    cli.add_common_args(parser, options=False,
                        config_help="YAML file (optional; the defaults are the tiny preset)",
                        overrides_help="set a config key, e.g. model.preset=smollm2-1.7b",
                        json_help="append the result as one JSON line to this file")
    args = cli.parse_args(parser, argv)
    cfg = load_config(args.config, args.overrides)  # a ConfigError exits 2 (cli.tool_main)
    result = benchmark(cfg, args.warmup, args.steps, args.vocab_size, args.peak_tflops)
    if result is not None:
        print(HEADER)
        print(as_markdown_row(result))
        if args.json:
            cli.append_json(args.json, to_dict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
