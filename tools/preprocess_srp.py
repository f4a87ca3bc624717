"""Tokenize JSONL, Parquet or text files into a Megatron indexed dataset with SRP metadata."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_srp.data.readers import TEXT_SPLITS, InputError
from megatron_srp.data.tokenizer import SRPTokenizer, default_tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", action="append", required=True,
                        help="input file or glob (.jsonl[.gz], .parquet, .txt, ...); repeatable")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>.bin/.idx/.meta.json and <prefix>.tokenizer/")
    parser.add_argument("--tokenizer", type=Path, default=default_tokenizer_dir(),
                        help="tokenizer directory with tokenizer.json (default: the shipped one)")
    parser.add_argument("--json-key", default="text",
                        help="JSONL key / Parquet column holding the text (default: %(default)s)")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="blank-lines",
                        help="how plain text files are cut into documents (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: CPU count, %(default)s)")
    parser.add_argument("--keep-special-tokens", action="store_true",
                        help="do not strip literal special-token strings from the input text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)

    # Imported here, not at the top: spawned workers re-import this script, and the
    # preprocess module pulls in Megatron-Core, which takes seconds to import.
    from megatron_srp.data.preprocess import preprocess

    tokenizer = SRPTokenizer.from_dir(args.tokenizer)
    try:
        result = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            stages=() if args.keep_special_tokens else None,
            workers=args.workers,
            text_key=args.json_key,
            text_split=args.text_split,
            overwrite=args.overwrite,
        )
    except (InputError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p = result.paths
    print(
        f"{result.documents} docs ({result.documents_in} read), {result.tokens} tokens, "
        f"{result.docs_per_second:.0f} docs/s in {result.seconds:.1f}s -> "
        f"{p['bin']} {p['idx']} {p['meta']} {p['tokenizer']}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
