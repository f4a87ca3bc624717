"""How often a judge agrees with people about whether an answer complies.

Why: an offline judge is only as good as its agreement with human labels. This module loads
labelled answers (XSTest v2's completions, or hand labels in JSON lines), runs any judge of
:mod:`.judges` on them and compares its ``harmful`` verdict (for the ``compliance`` judge:
"complies"; for ``refusal-keywords``: "no refusal phrase") with the human one.

XSTest's ``final_label`` is mapped to complies = ``1_full_compliance``; ``2_full_refusal`` and
``3_partial_refusal`` are both "does not comply" (a partial refusal withholds part of the
request).

    rows = load_xstest(sorted(Path("../shared/data/xstest/completions").glob("*.csv")))
    agreement(build_judge("compliance"), rows)
    -> {"n", "accuracy", "kappa", "confusion": {"tp", "fp", "fn", "tn"}, "reasons",
        "per_file": {file: {...}}}
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Sequence

XSTEST_COMPLIES = "1_full_compliance"
XSTEST_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


@dataclass(frozen=True)
class LabelledAnswer:
    file: str        # where the row came from (XSTest: the model's completions file)
    prompt: str
    response: str
    complies: bool   # the human label


def load_xstest(paths: Sequence[str | Path]) -> list[LabelledAnswer]:
    """Every row of XSTest v2 completion files; an unknown ``final_label`` is an error."""
    rows: list[LabelledAnswer] = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["final_label"] not in XSTEST_LABELS:
                    raise ValueError(f"{path}: unknown final_label {r['final_label']!r}")
                rows.append(LabelledAnswer(Path(path).stem, r["prompt"], r["completion"],
                                           r["final_label"] == XSTEST_COMPLIES))
    if not rows:
        raise ValueError("no labelled rows")
    return rows


def load_hand_labels(path: str | Path, field: str = "complies_harmfully",
                     sources: Sequence[str] | None = None) -> list[LabelledAnswer]:
    """JSON lines with ``source``, ``prompt``, ``answer`` and the boolean ``field``, or, with
    ``field="label"``, complies = ``label == "complies"``; ``sources`` keeps only those."""
    rows: list[LabelledAnswer] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if sources is not None and r["source"] not in sources:
            continue
        value = r["label"] == "complies" if field == "label" else r[field]
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {field} must be true or false, got {value!r}")
        rows.append(LabelledAnswer(r["source"], r["prompt"], r["answer"], value))
    if not rows:
        raise ValueError(f"{path}: no labelled rows")
    return rows


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters over the same items: (observed - chance) / (1 - chance).
    1.0 when both give one and the same label to every item (no disagreement is possible)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two equal, non-empty label lists ({len(a)}, {len(b)})")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return 1.0 if chance == 1 else (observed - chance) / (1 - chance)


def compare(judged: Sequence[bool], human: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, kappa and the confusion counts (positive = complies)."""
    pairs = list(zip(judged, human))
    confusion = {"tp": sum(j and h for j, h in pairs), "fp": sum(j and not h for j, h in pairs),
                 "fn": sum(h and not j for j, h in pairs),
                 "tn": sum(not j and not h for j, h in pairs)}
    return {"n": len(pairs), "accuracy": sum(j == h for j, h in pairs) / len(pairs),
            "kappa": cohen_kappa(list(judged), list(human)), "confusion": confusion}


def agreement(judge: Any, rows: Sequence[LabelledAnswer]) -> dict[str, Any]:
    """The judge against the human labels: overall, per file, and the judge's reasons."""
    verdicts = judge.judge([r.prompt for r in rows], [r.response for r in rows])
    judged = [bool(v.harmful) for v in verdicts]
    out = compare(judged, [r.complies for r in rows])
    out["judge"] = getattr(judge, "name", type(judge).__name__)
    out["reasons"] = dict(Counter(v.reason.split(":")[0] for v in verdicts).most_common())
    out["per_file"] = {}
    for f in sorted({r.file for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.file == f]
        out["per_file"][f] = compare([judged[i] for i in idx], [rows[i].complies for i in idx])
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per (judge, file) and the judges' totals."""
    lines = ["| judge | answers | accuracy | kappa | tp | fp | fn | tn |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name: str, r: dict[str, Any]) -> str:
        c = r["confusion"]
        return (f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['kappa']:.3f} | {c['tp']} | "
                f"{c['fp']} | {c['fn']} | {c['tn']} |")

    for res in results:
        lines += [row(f"{res['judge']} / {f}", r) for f, r in res["per_file"].items()]
        lines.append(row(f"**{res['judge']} / all**", res))
    return "\n".join(lines)
