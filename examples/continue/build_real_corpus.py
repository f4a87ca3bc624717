"""A small real-text corpus from ../shared/data for continued pretraining with SRP, with a
seeded held-out part for evaluation (docs/results/real-model-continued.md).

    python examples/continue/build_real_corpus.py [--data-dir ../shared/data] \
        [--out-dir data/real-corpus] [--train-chars 1200000] [--heldout-chars 300000] [--seed 0]

The units (paragraphs, statements, transcripts, answers) are read by the readers of the
preprocessing benchmark's corpus (``megatron_srp.bench.corpus.SOURCES``): WikiText-2 valid and
test, the chosen hh-rlhf harmless-base transcripts, Do-Not-Answer questions with a model's
answer, and the ToxiGen human-written statements (the de-duplicated statements of the ToxiGen
prompt files, so the prompt files add no other text). AdvBench, HarmBench, JailbreakBench and
XSTest are evaluation data and stay out. Every unit goes to one side only: a seeded shuffle
per source puts units on the held-out side until that source's share of ``--heldout-chars``
is reached, and the rest (up to its share of ``--train-chars``) goes to training. Each side is
then packed into documents of ``--min-chars``..``--max-chars`` (seeded) and written as JSONL
``{"id", "text", "source"}``: ``<out-dir>/train.jsonl``, ``<out-dir>/heldout.jsonl`` and
``<out-dir>/corpus.json`` (the parameters and counts).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from megatron_srp.bench.corpus import SOURCES, _pack, default_data_dir  # noqa: E402

# Source -> share of each side's characters: general text (WikiText) and dialogue (hh-rlhf)
# carry the language modelling; Do-Not-Answer and ToxiGen carry most of the unsafe segments.
SHARES = {"wikitext2-valid": 0.25, "wikitext2-test": 0.20, "hh_rlhf": 0.25,
          "do_not_answer": 0.18, "toxigen": 0.12}


def build(data_dir: Path, out_dir: Path, train_chars: int, heldout_chars: int, seed: int,
          min_chars: int = 300, max_chars: int = 3000) -> dict:
    readers = {name: (rel, fn) for name, rel, fn in SOURCES}
    sides: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    counts: dict[str, dict[str, int]] = {}
    for name, share in SHARES.items():
        rel, fn = readers[name]
        path = data_dir / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} (source {name!r}) is missing")
        units = list(dict.fromkeys(u for u in fn(path) if u.strip()))  # distinct, in order
        random.Random(f"{seed}:{name}").shuffle(units)
        held, train, size = [], [], 0
        budget_held, budget_train = share * heldout_chars, share * train_chars
        it = iter(units)
        for u in it:
            if size >= budget_held:
                train.append(u)
                size = len(u)
                break
            held.append(u)
            size += len(u)
        for u in it:
            if size >= budget_train:
                break
            train.append(u)
            size += len(u)
        counts[name] = {"units": len(units), "heldout_units": len(held), "train_units": len(train),
                        "heldout_chars": sum(map(len, held)), "train_chars": sum(map(len, train))}
        rng = random.Random(f"{seed}:{name}:pack")
        for side, part in (("heldout", held), ("train", train)):
            sides[side] += [(name, d) for d in _pack(part, rng, min_chars, max_chars)]
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"data_dir": str(data_dir.resolve()), "seed": seed, "train_chars": train_chars,
              "heldout_chars": heldout_chars, "min_chars": min_chars, "max_chars": max_chars,
              "shares": SHARES, "sources": counts, "documents": {}}
    for side, docs in sides.items():
        random.Random(f"{seed}:{side}").shuffle(docs)
        with open(out_dir / f"{side}.jsonl", "w", encoding="utf-8") as f:
            for i, (name, text) in enumerate(docs):
                f.write(json.dumps({"id": f"{side}-{i}", "text": text, "source": name},
                                   ensure_ascii=False) + "\n")
        record["documents"][side] = len(docs)
    (out_dir / "corpus.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data" / "real-corpus")
    p.add_argument("--train-chars", type=int, default=1_200_000)
    p.add_argument("--heldout-chars", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    record = build(args.data_dir or default_data_dir(), args.out_dir, args.train_chars,
                   args.heldout_chars, args.seed)
    for name, c in record["sources"].items():
        print(f"{name}: {c['train_units']} train / {c['heldout_units']} held-out units "
              f"({c['train_chars']:,} / {c['heldout_chars']:,} chars) of {c['units']}")
    print(f"documents: {record['documents']} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
