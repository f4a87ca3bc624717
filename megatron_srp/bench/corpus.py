"""A deterministic JSONL corpus of a target size, built from the shared data, for the
preprocessing benchmark (docs/bench_preprocess_method.md, "The corpus")."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_FORMAT = 1
MB = 1 << 20


def _wikitext(path: Path) -> list[str]:
    """Paragraphs; an article's title is prefixed to its first paragraph."""
    units, title = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("=") and line.endswith("="):
            title = (title + "\n\n" if title else "") + line.strip("= ").strip()
            continue
        line = re.sub(r" @(.)@ ", r"\1", line)  # the tokenised files' " @-@ ", " @,@ ", " @.@ "
        units.append(f"{title}\n\n{line}" if title else line)
        title = ""
    return units


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# (name, file relative to the data dir, units from the file). AdvBench, HarmBench, JBB and XSTest
# are evaluation sets and stay out (SOURCES.md); the rest is general, dialogue and unsafe text.
SOURCES: list[tuple[str, str, Callable[[Path], list[str]]]] = [
    ("wikitext2-valid", "wikitext2/valid.txt", _wikitext),
    ("wikitext2-test", "wikitext2/test.txt", _wikitext),
    ("tinyshakespeare", "tinyshakespeare/input.txt",
     lambda p: [b.strip() for b in p.read_text(encoding="utf-8").split("\n\n") if b.strip()]),
    ("hh_rlhf", "hh_rlhf/harmless-base/test.jsonl.gz",
     lambda p: [r["chosen"].strip() for r in _jsonl(p)]),
    ("do_not_answer", "do_not_answer/do_not_answer_responses.jsonl",
     lambda p: [f"{r['question']}\n\n{r['text']}" for r in _jsonl(p)]),
    ("toxigen", "toxigen/toxigen_statements.jsonl", lambda p: [r["text"] for r in _jsonl(p)]),
    ("gsm8k-train", "gsm8k/train_sample2000.jsonl",
     lambda p: [f"{r['question']}\n{r['answer']}" for r in _jsonl(p)]),
    ("gsm8k-test", "gsm8k/test.jsonl",
     lambda p: [f"{r['question']}\n{r['answer']}" for r in _jsonl(p)]),
    ("alpaca-seed", "alpaca/seed_tasks.jsonl",
     lambda p: ["\n".join([r["instruction"]] + [i["output"] for i in r["instances"]])
                for r in _jsonl(p)]),
    ("alpaca", "alpaca/alpaca_instructions_noinput_sample2000.json",
     lambda p: [r["instruction"] for r in json.loads(p.read_text(encoding="utf-8"))]),
]


def default_data_dir() -> Path:
    return Path(os.environ.get("SRP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _pack(units: Sequence[str], rng: random.Random, min_chars: int, max_chars: int) -> list[str]:
    """Units in a shuffled order, joined into documents of a random length each."""
    order = list(range(len(units)))
    rng.shuffle(order)
    docs, parts, size, target = [], [], 0, rng.randint(min_chars, max_chars)
    for i in order:
        parts.append(units[i])
        size += len(units[i]) + 2
        if size >= target:
            docs.append("\n\n".join(parts))
            parts, size, target = [], 0, rng.randint(min_chars, max_chars)
    if parts:
        docs.append("\n\n".join(parts))
    return docs


def build_corpus(out: str | Path, target_mb: float, data_dir: str | Path | None = None,
                 seed: int = 0, min_chars: int = 300, max_chars: int = 3000) -> dict[str, Any]:
    """Write ``out`` (JSONL ``{"id", "text"}``) of at least ``target_mb`` MiB; return its record.

    Every cycle through the material shuffles and packs it anew (seeded by cycle), and a document
    whose text was already written is skipped, so no two documents are byte-identical. The file
    is written to a temporary name and renamed; ``<out>.json`` records the parameters, and a
    corpus whose record matches is reused as it is.
    """
    out, data_dir = Path(out), Path(data_dir or default_data_dir())
    files = [(n, data_dir / rel, fn) for n, rel, fn in SOURCES if (data_dir / rel).is_file()]
    if not files:
        raise FileNotFoundError(f"none of the corpus sources is under {data_dir}")
    params = {"format": CORPUS_FORMAT, "target_bytes": int(target_mb * MB), "seed": seed,
              "min_chars": min_chars, "max_chars": max_chars,
              "sources": {n: p.stat().st_size for n, p, _ in files}}
    sidecar = out.with_name(out.name + ".json")
    if sidecar.is_file() and out.is_file():
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if record.get("params") == params and record.get("bytes") == out.stat().st_size:
            return record
    units = {n: fn(p) for n, p, fn in files}
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    seen: set[bytes] = set()
    written = docs = cycle = duplicates = 0
    per_source: dict[str, int] = {n: 0 for n in units}
    try:
        with open(temp, "wb") as f:
            while written < params["target_bytes"]:
                rng = random.Random(f"{seed}:{cycle}")
                batch = [(n, d) for n in units for d in _pack(units[n], rng, min_chars, max_chars)]
                rng.shuffle(batch)
                for name, text in batch:
                    digest = hashlib.blake2b(text.encode(), digest_size=12).digest()
                    if digest in seen:
                        duplicates += 1
                        continue
                    seen.add(digest)
                    line = json.dumps({"id": f"c{cycle}-{docs}", "text": text},
                                      ensure_ascii=False).encode() + b"\n"
                    f.write(line)
                    written, docs = written + len(line), docs + 1
                    per_source[name] += 1
                    if written >= params["target_bytes"]:
                        break
                cycle += 1
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    record = {"params": params, "bytes": written, "documents": docs, "cycles": cycle,
              "duplicates_skipped": duplicates, "documents_per_source": per_source,
              "data_dir": str(data_dir.resolve())}
    tmp_sidecar = sidecar.with_name(sidecar.name + ".tmp")
    tmp_sidecar.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_sidecar, sidecar)
    return record


