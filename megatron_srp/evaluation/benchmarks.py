"""Harmful-request and benign-prompt benchmarks, loaded from their published files.

Each loader reads one file format and returns :class:`Behavior` rows; a missing file, a missing
column or an empty prompt is a :class:`BenchmarkError` that names the file (and row, and the
columns that were found), never a silent skip. Default paths point into ``../shared/data``
(see its SOURCES.md); every loader takes any file of the same format by path, so HarmBench's
held-out test split, which is not in this repository, loads the same way.

| name | file format | harmful | category |
|---|---|---|---|
| ``advbench`` | CSV ``goal,target`` | yes | none (AdvBench has none) |
| ``advbench-completion`` | the same | yes | none; the prompt is a completion prefix for base models |
| ``harmbench`` | HarmBench CSV (``Behavior, SemanticCategory, ContextString, BehaviorID``) | yes | ``SemanticCategory`` |
| ``jailbreakbench`` | JBB CSV (``Goal, Target, Category``) | yes | ``Category`` |
| ``jailbreakbench-benign`` | the benign JBB CSV (lower-case columns) | no | ``category`` |
| ``alpaca`` | JSON list of ``{instruction}`` | no | none |
| ``xstest`` | XSTest CSV (``id, prompt, type, label``) | the ``unsafe`` rows | ``type`` |
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

SHARED = Path(os.environ.get("SRP_SHARED_DATA",
                             Path(__file__).resolve().parents[2].parent / "shared" / "data"))


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Behavior:
    """One prompt of a benchmark: what is asked, whether it is harmful, and its category."""

    id: str
    prompt: str
    harmful: bool
    category: Optional[str] = None
    target: Optional[str] = None      # the affirmative answer start, where the benchmark has one
    benchmark: str = ""


def _csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; the file has "
                                 f"{', '.join(c for c in columns if c) or 'no header'}")
        return [(line, row) for line, row in enumerate(reader, start=2)]


def _text(path: Path, line: int, row: dict[str, str], column: str) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise BenchmarkError(f"{path}:{line}: empty {column!r}")
    return value


def load_advbench(path: Path, completion: bool = False) -> list[Behavior]:
    """AdvBench harmful behaviours. ``completion``: the prompt is the request followed by the
    start of a compliant answer (the target), a prefix a base model continues."""
    rows = _csv_rows(path, ("goal", "target"))
    out = []
    for line, row in rows:
        goal, target = _text(path, line, row, "goal"), _text(path, line, row, "target")
        prompt = f"{goal}.\n{target}:\n" if completion else goal
        out.append(Behavior(id=f"advbench-{line - 1}", prompt=prompt, harmful=True,
                            target=target, benchmark="advbench-completion" if completion
                            else "advbench"))
    return out


def load_harmbench(path: Path) -> list[Behavior]:
    """HarmBench behaviours (any split): a contextual behaviour's prompt is its context, a
    separator, then the request, as HarmBench formats it."""
    rows = _csv_rows(path, ("Behavior", "SemanticCategory", "ContextString", "BehaviorID"))
    out = []
    for line, row in rows:
        behavior = _text(path, line, row, "Behavior")
        context = (row.get("ContextString") or "").strip()
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        out.append(Behavior(id=_text(path, line, row, "BehaviorID"), prompt=prompt, harmful=True,
                            category=_text(path, line, row, "SemanticCategory"),
                            benchmark="harmbench"))
    return out


def load_jailbreakbench(path: Path, benign: bool = False) -> list[Behavior]:
    """JailbreakBench behaviours: the harmful file has capitalised columns, the benign one
    lower-case ones."""
    goal, target, category = ("goal", "target", "category") if benign else \
        ("Goal", "Target", "Category")
    rows = _csv_rows(path, (goal, target, category))
    name = "jailbreakbench-benign" if benign else "jailbreakbench"
    return [Behavior(id=f"{name}-{line - 1}", prompt=_text(path, line, row, goal),
                     harmful=not benign, category=_text(path, line, row, category),
                     target=_text(path, line, row, target), benchmark=name)
            for line, row in rows]


def load_alpaca(path: Path) -> list[Behavior]:
    """Alpaca instructions (benign), from a JSON list of objects with ``instruction``."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(items, list):
        raise BenchmarkError(f"{path}: expected a JSON list of objects with 'instruction'")
    out = []
    for i, item in enumerate(items):
        text = item.get("instruction", "").strip() if isinstance(item, dict) else ""
        if not text:
            raise BenchmarkError(f"{path}: item {i} has no 'instruction'")
        out.append(Behavior(id=f"alpaca-{item.get('row_index', i)}", prompt=text, harmful=False,
                            benchmark="alpaca"))
    return out


def load_xstest(path: Path) -> list[Behavior]:
    """XSTest prompts: safe prompts that look unsafe (for over-refusal) and unsafe contrasts."""
    rows = _csv_rows(path, ("id", "prompt", "type", "label"))
    out = []
    for line, row in rows:
        label = _text(path, line, row, "label")
        if label not in ("safe", "unsafe"):
            raise BenchmarkError(f"{path}:{line}: label must be 'safe' or 'unsafe', got {label!r}")
        out.append(Behavior(id=f"xstest-{_text(path, line, row, 'id')}",
                            prompt=_text(path, line, row, "prompt"), harmful=label == "unsafe",
                            category=_text(path, line, row, "type"), benchmark="xstest"))
    return out


#: name -> (loader, default path under the shared data directory)
BENCHMARKS: dict[str, tuple[Callable[[Path], list[Behavior]], str]] = {
    "advbench": (load_advbench, "advbench/harmful_behaviors.csv"),
    "advbench-completion": (lambda p: load_advbench(p, completion=True),
                            "advbench/harmful_behaviors.csv"),
    "harmbench": (load_harmbench, "harmbench/harmbench_behaviors_text_val.csv"),
    "jailbreakbench": (load_jailbreakbench, "jailbreakbench/harmful_behaviors.csv"),
    "jailbreakbench-benign": (lambda p: load_jailbreakbench(p, benign=True),
                              "jailbreakbench/benign_behaviors.csv"),
    "alpaca": (load_alpaca, "alpaca/alpaca_instructions_noinput_sample2000.json"),
    "xstest": (load_xstest, "xstest/xstest_prompts.csv"),
}


def load_benchmark(name: str, path: Optional[str | Path] = None) -> list[Behavior]:
    """A benchmark by name, from ``path`` or its default file in the shared data."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    loader, default = BENCHMARKS[name]
    return loader(Path(path) if path else SHARED / default)
