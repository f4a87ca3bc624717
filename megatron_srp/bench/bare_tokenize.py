"""Bare tokenization, the floor of preprocessing: read a JSONL corpus, parse each line, and
encode the texts with ``tokenizers``' ``encode_batch`` on N threads. Nothing is written but a
JSON line of counts; the preprocessing benchmark runs this as its own subprocess, like the
tools it compares, so start-up, reading and JSON parsing count in both.

    python -m megatron_srp.bench.bare_tokenize --input corpus.jsonl --tokenizer DIR \\
        --threads 2 --counts out/bare.json

It imports only the standard library and ``tokenizers`` (no torch, no Megatron-Core): what a
minimal tokenization script costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

BATCH_DOCS = 1024


def tokenize_corpus(path: str | Path, tokenizer_file: str | Path, json_key: str = "text",
                    batch_docs: int = BATCH_DOCS) -> dict[str, int]:
    """Documents and tokens (one end-of-document per document counted, as the datasets do)
    of ``path`` encoded in batches of ``batch_docs`` documents."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    documents = tokens = 0
    batch: list[str] = []

    def flush() -> int:
        encoded = tokenizer.encode_batch(batch, add_special_tokens=False)
        return sum(len(e.ids) + 1 for e in encoded)

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                batch.append(json.loads(line)[json_key])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: no text under key {json_key!r} ({exc})"
                                 ) from None
            if len(batch) >= batch_docs:
                tokens += flush()
                documents += len(batch)
                batch = []
    if batch:
        tokens += flush()
        documents += len(batch)
    return {"documents": documents, "tokens": tokens}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL corpus")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer directory (with tokenizer.json) or tokenizer.json")
    parser.add_argument("--threads", type=int, required=True,
                        help="tokenizer threads (RAYON_NUM_THREADS)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--batch-docs", type=int, default=BATCH_DOCS)
    parser.add_argument("--counts", required=True, help="write the counts (JSON) here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    # Read by the tokenizers library when its thread pool starts: set before the first encode.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tokenizer_file = Path(args.tokenizer)
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / "tokenizer.json"
    start = time.perf_counter()
    try:
        counts = tokenize_corpus(args.input, tokenizer_file, args.json_key, args.batch_docs)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts.update(threads=args.threads, seconds_in_loop=time.perf_counter() - start)
    Path(args.counts).write_text(json.dumps(counts) + "\n")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
