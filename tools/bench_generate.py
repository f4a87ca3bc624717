"""Generation throughput (tokens/s) of greedy, sampling, beam search and SafeBeam, against
Hugging Face ``generate`` on the exported model (same weights, same device).

    python tools/bench_generate.py                                  # fresh tiny model, CPU
    python tools/bench_generate.py --checkpoint runs/tiny-cpu-demo --report /tmp/gen.json
    python tools/bench_generate.py --preset smollm2-135m --batches 1,8 --max-new-tokens 32

See megatron_srp/bench/generate.py for the method, docs/benchmarks.md for results.
"""
import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from megatron_srp import cli

REPO = Path(__file__).resolve().parent.parent


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="run directory or iter_N (default: a fresh model)")
    parser.add_argument("--preset", default="tiny", help="fresh model's preset (default: tiny)")
    parser.add_argument("--seq-length", type=int, default=256,
                        help="fresh model's context (default: %(default)s)")
    parser.add_argument("--methods", default="greedy,sample,beam,safebeam",
                        help="comma-separated (default: %(default)s)")
    parser.add_argument("--batches", default="1,32", help="batch sizes (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--num-beams", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each case (default: %(default)s)")
    parser.add_argument("--text", type=Path,
                        default=Path(os.environ.get("SRP_SHARED_DATA", REPO.parent / "shared" /
                                                    "data")) / "tinyshakespeare" / "input.txt",
                        help="prompts are cut from this file (default: %(default)s)")
    parser.add_argument("--report", type=Path, help="write JSON here and Markdown beside it")
    cli.add_common_args(parser, example="max_new_tokens",
                        json_help="append the figures (--report's JSON) as one JSON line to "
                                  "FILE")
    args = cli.parse_args(parser, argv)
    methods = [m for m in args.methods.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    warnings.filterwarnings("ignore")
    from megatron_srp.bench import generate as bench
    from megatron_srp.inference.sample import shutdown

    unknown = sorted(set(methods) - set(bench.METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {bench.METHODS}")
    model, hf, tokenizer, described = bench.build_models(args.checkpoint, args.preset,
                                                         args.seq_length)
    try:
        prompts = bench.prompts_from(args.text, tokenizer, max(batches), args.prompt_tokens)
        print(f"# {described}", flush=True)
        rows = bench.run_bench(model, hf, tokenizer, prompts, batches, methods,
                               args.max_new_tokens, args.num_beams, args.repeats,
                               log=lambda line: print(line, flush=True))
    finally:
        shutdown()
    report = {"machine": bench.machine(REPO), "model": described, "batches": batches,
              "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
              "num_beams": args.num_beams, "repeats": args.repeats, "rows": rows,
              "ratios": bench.ratios(rows)}
    text = bench.markdown(report)
    print("\n" + text)
    if args.json:
        cli.append_json(args.json, report)
    if args.report:
        from megatron_srp.units import write_atomic
        write_atomic(args.report, json.dumps(report, indent=1) + "\n")
        write_atomic(args.report.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
