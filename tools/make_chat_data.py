"""Write a finetuning set as chat JSONL from the shared public data.

    python tools/make_chat_data.py --source alpaca-seed --output data/chat/alpaca_seed.jsonl
    python tools/make_chat_data.py --source do-not-answer-harmful --limit 100 --output data/chat/harmful.jsonl

    python tools/make_chat_data.py --source alpaca-seed --reflect embedded --output data/chat/alpaca_reflect.jsonl

--reflect CLASSIFIER labels every response once and appends its reflection after it
(<|reflect|>Safe<|/reflect|>, ...), so instruction tuning keeps an SRP model reflecting
(docs/finetuning.md).

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
    parser.add_argument("--reflect", metavar="CLASSIFIER", default=None,
                        help="append each response's reflection from this classifier: "
                             "embedded, hf, llm-judge (default: none)")
    parser.add_argument("--reflect-option", action="append", default=[], metavar="KEY=VALUE",
                        help="classifier option, e.g. threshold=0.6; repeatable")
    parser.add_argument("--reflect-without-category", action="store_true",
                        help="write a bare 'Unsafe' instead of 'Unsafe: S<n>'")
    cli.add_common_args(parser, example="limit")
    args = cli.parse_args(parser, argv)
    try:
        reflection = None
        if args.reflect:
            import yaml

            from megatron_srp.data.chat_reflect import ChatReflection
            from megatron_srp.reflection.classifiers import build_classifier
            options = {}
            for item in args.reflect_option:
                key, eq, value = item.partition("=")
                if not eq:
                    raise ValueError(f"--reflect-option {item!r} is not KEY=VALUE")
                options[key.strip()] = yaml.safe_load(value)
            reflection = ChatReflection(build_classifier(args.reflect, **options),
                                        include_category=not args.reflect_without_category)
        n = write_chat_source(args.source, args.shared_data, args.output, args.limit, args.seed,
                              transform=reflection)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {cli.error_line(exc)}", file=sys.stderr)
        return 2
    print(f"{n} records -> {args.output}")
    if reflection is not None:
        print("reflections: " + ", ".join(f"{k} {v}" for k, v in
                                          sorted(reflection.counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
