"""Serving load benchmark: requests/s, tokens/s and p50/p99 latency at several client
concurrencies against tools/serve_srp.py, beside the same prompts decoded offline in one batch.

    python tools/bench_serve.py --checkpoint runs/tiny-cpu-demo
    python tools/bench_serve.py --checkpoint RUN --requests 128 --concurrency 1,4,16 --json out.jsonl

See megatron_srp/bench/serve.py for the method, docs/benchmarks.md for results.
"""
import argparse
import json
import sys

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory or iter_N")
    parser.add_argument("--requests", type=int, default=64,
                        help="prompts answered at each concurrency (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--concurrency", default="1,4,16",
                        help="comma-separated client counts (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="the server's --max-batch (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="OMP threads of the server, and of the offline run "
                             "(default: %(default)s)")
    parser.add_argument("--prompts-file", help="text file whose lines start the prompts "
                                               "(default: tinyshakespeare from the shared data)")
    cli.add_common_args(parser, example="requests", json_help="append the figures as one JSON "
                                                              "line to FILE")
    args = cli.parse_args(parser, argv)
    concurrency = [int(c) for c in args.concurrency.split(",") if c]

    import torch

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.bench.serve import bench_serve, markdown

    torch.set_num_threads(args.threads)
    result = bench_serve(args.checkpoint, requests=args.requests, max_tokens=args.max_tokens,
                         concurrency=concurrency, max_batch=args.max_batch,
                         prompts_file=args.prompts_file, threads=args.threads)
    print(markdown(result))
    if args.json:
        cli.append_json(args.json, result)
    else:
        print(json.dumps(result["served"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
