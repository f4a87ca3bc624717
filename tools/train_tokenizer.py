"""Train the project's byte-level BPE tokenizer; the defaults reproduce the shipped asset."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_srp.tokenizer import default_tokenizer_dir, train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent

DEFAULT_FILES = ("tinyshakespeare/input.txt", "wikitext2/valid.txt", "wikitext2/test.txt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
