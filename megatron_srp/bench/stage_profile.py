"""Where preprocessing spends its CPU time, per stage, from py-spy's raw (collapsed) stacks.

    py-spy record --subprocesses --format raw -r 100 -o raw-w2.txt -- \\
        python tools/preprocess_srp.py --input corpus.jsonl --workers 2 --output-dir out ...
    python -m megatron_srp.bench.stage_profile raw-w1.txt raw-w2.txt --rate 100

py-spy samples only running threads, in every process of the tree, so a stage's samples divided
by the rate are CPU seconds. Each sample goes to the first stage in :data:`STAGES` order that
one of its frames matches (classification before tokenization: a classifier that reads texts
tokenizes them again, and that is its cost).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

# (stage, [(file substring, function substring or "" for any)]), in priority order.
STAGES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("start-up (imports, tokenizer and classifier loading)",
     (("<frozen importlib", ""), ("tokenizer.py", "from_dir"), ("classifiers.py", "__init__"),
      ("variants.py", ""), ("labeling.py", "describe"), ("segment.py", "describe"))),
    ("merging shards", (("outputs.py", "merge_variant"), ("outputs.py", "publish"))),
    ("classification", (("classifiers.py", ""), ("features.py", ""),
                        ("labeling.py", "_segment_ids"))),
    ("segmenting (sentence ends, cuts)", (("segment.py", ""),)),
    ("reflection text and splicing", (("interventions/", ""), ("shard_worker.py", "_splice"),
                                      ("shard_worker.py", "_special_ids"))),
    ("tokenization (encode_batch)", (("tokenizer.py", "encode"), ("tokenizer.py", "tokenize"),
                                     ("bare_tokenize.py", "flush"))),
    ("writing (ids, lengths, label sidecar)", (("shard_worker.py", "add"),
                                               ("shard_worker.py", "flush"),
                                               ("shard_worker.py", "close"),
                                               ("shard_worker.py", "_sidecar_lines"),
                                               ("shard_worker.py", "_write_variant"))),
    ("read and JSON parse", (("readers.py", ""), ("shards.py", "read_shard"),
                             ("bare_tokenize.py", "tokenize_corpus"))),
    ("input stages (special-token strip)", (("documents.py", ""),)),
    ("scanning shards, labelling loop, other", (("", ""),)),
)


def _frames(stack: str) -> list[tuple[str, str]]:
    """``[(function, file), ...]`` of one collapsed stack (``func (file:line);...``)."""
    out = []
    for frame in stack.split(";")[1:]:  # the first entry names the process
        func, _, where = frame.partition(" (")
        out.append((func, where.rsplit(":", 1)[0]))
    return out


def stage_of(stack: str) -> str:
    frames = _frames(stack)
    for stage, rules in STAGES:
        for file_part, func_part in rules:
            if any(file_part in f and func_part in fn for fn, f in frames):
                return stage
    return STAGES[-1][0]


def stage_samples(path: str | Path) -> Counter:
    """Samples per stage in one py-spy ``--format raw`` file."""
    counts: Counter = Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                raise ValueError(f"{path}:{number}: not a py-spy raw line (stack, space, count)")
            counts[stage_of(stack)] += int(n)
    return counts


def markdown_table(paths: Sequence[str | Path], rate: float) -> str:
    """One column per profile: CPU seconds per stage (samples / rate) and the share."""
    columns = [stage_samples(p) for p in paths]
    names = [Path(p).stem for p in paths]
    lines = ["| stage | " + " | ".join(names) + " |", "|---" * (len(paths) + 1) + "|"]
    for stage, _ in STAGES:
        cells = [f"{c[stage] / rate:.1f} s ({100 * c[stage] / max(1, sum(c.values())):.0f}%)"
                 for c in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| total CPU | " + " | ".join(f"{sum(c.values()) / rate:.1f} s"
                                                for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", help="py-spy --format raw files")
    parser.add_argument("--rate", type=float, default=100, help="py-spy's -r (samples/s)")
    args = parser.parse_args(argv)
    try:
        print(markdown_table(args.profiles, args.rate), end="")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
