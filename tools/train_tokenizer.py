"""Train the project's byte-level BPE tokenizer; the defaults reproduce the shipped asset.

    python tools/train_tokenizer.py --out-dir /tmp/tok --vocab-size 4096
    python tools/train_tokenizer.py --data-dir DIR --files a.txt b.txt --out-dir /tmp/tok

Put key=value items before --files (which takes every word after it), or write files=[a,b].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_srp import cli
from megatron_srp.tokenizer import default_tokenizer_dir, train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent

DEFAULT_FILES = ("tinyshakespeare/input.txt", "wikitext2/valid.txt", "wikitext2/test.txt")


@cli.tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="directory the --files are relative to (default: %(default)s)")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES),
                        help="training text files, relative to --data-dir (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="total ids including special tokens (default: %(default)s)")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--name", default=None, help="tokenizer name (default: srp-bpe-<vocab>)")
    parser.add_argument("--out-dir", type=Path, default=default_tokenizer_dir(),
                        help="output directory (default: %(default)s)")
    cli.add_common_args(parser, example="vocab_size")
    args = cli.parse_args(parser, argv)

    tok = train_bpe_tokenizer(
        [args.data_dir / f for f in args.files],
        args.vocab_size,
        args.out_dir,
        name=args.name,
        min_frequency=args.min_frequency,
    )
    ids = ", ".join(f"{t}={i}" for t, i in tok.special_token_ids.items())
    print(f"{tok.name}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint}, {ids}")
    print(f"saved to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
