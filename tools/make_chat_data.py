"""Write a finetuning set as chat JSONL from the shared public data.

    python tools/make_chat_data.py --source alpaca-seed --output data/chat/alpaca_seed.jsonl
    python tools/make_chat_data.py --source do-not-answer-harmful --limit 100 --output data/chat/harmful.jsonl

Sources: alpaca-seed, do-not-answer-refusals, gsm8k, do-not-answer-harmful, hh-rlhf-rejected
(see megatron_srp/data/chat_sources.py and docs/finetuning.md).
"""
import argparse
import sys

from megatron_srp import cli
from megatron_srp.data.chat_sources import SOURCES, write_chat_source

from megatron_srp.evaluation.benchmarks import SHARED as DEFAULT_SHARED


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--output", required=True, help="chat JSONL file to write")
    parser.add_argument("--limit", type=int, default=None,
                        help="a seeded sample of this many records (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-data", default=DEFAULT_SHARED,
                        help="the shared data directory (default: $SRP_SHARED_DATA or "
                             "../shared/data beside the repository)")
    cli.add_common_args(parser, example="limit")
    args = cli.parse_args(parser, argv)
    try:
        n = write_chat_source(args.source, args.shared_data, args.output, args.limit, args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} records -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
