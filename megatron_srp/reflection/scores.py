"""Safety-classification metrics, shared by every place that compares verdicts with labels:
the classifiers' held-out report (``reflection/train_classifier.py``) and a language model's
reflection accuracy (``evaluation/reflection_accuracy.py``). They live here, beside the
classifiers, because evaluation sits above this package and the classifiers' report needs
them too.

A verdict is safe, or unsafe with an optional hazard category. The report gives accuracy,
balanced accuracy, precision / recall / F1 for each class, the safe/unsafe confusion matrix,
per-category P/R/F1 with "safe" as one more class, the category confusion, and how often the
category is right among unsafe examples that were flagged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy


@dataclass(frozen=True)
class Verdict:
    safe: bool
    category: Optional[str] = None  # a taxonomy code for unsafe verdicts, else None


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 (0.0 where undefined) and the support ``tp + fn``."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
            "support": tp + fn}


def _class_order(taxonomy: Taxonomy):
    codes = list(taxonomy.codes)

    def key(c: str):
        if c == "safe":
            return (0, 0, "")
        if c in codes:
            return (1, codes.index(c), "")
        return (2, 0, c)  # categories outside the taxonomy come last, by name
    return key


def classification_report(truth: Sequence[Verdict], predicted: Sequence[Verdict],
                          taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> dict[str, Any]:
    """Compare ``predicted`` with ``truth`` (same order); see the module docstring."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels but {len(predicted)} predictions")
    if not truth:
        raise ValueError("no verdicts to compare")
    pairs = list(zip(truth, predicted))
    tp = sum(not t.safe and not p.safe for t, p in pairs)
    tn = sum(t.safe and p.safe for t, p in pairs)
    fp = sum(t.safe and not p.safe for t, p in pairs)
    fn = sum(not t.safe and p.safe for t, p in pairs)
    report: dict[str, Any] = {
        "n": len(pairs),
        "accuracy": round((tp + tn) / len(pairs), 4),
        "balanced_accuracy": round(0.5 * (tp / max(tp + fn, 1) + tn / max(tn + fp, 1)), 4),
        "per_class": {"unsafe": prf(tp, fp, fn), "safe": prf(tn, fn, fp)},
        "confusion": {"true_safe": {"pred_safe": tn, "pred_unsafe": fp},
                      "true_unsafe": {"pred_safe": fn, "pred_unsafe": tp}},
    }
    # Categories: over examples whose true label is safe or has a category; "safe" is a class.
    rows = [(t.category if not t.safe else "safe", p.category if not p.safe else "safe")
            for t, p in pairs if t.safe or t.category]
    classes = sorted({t for t, _ in rows} | {p for _, p in rows if p is not None},
                     key=_class_order(taxonomy))
    report["per_category"] = {
        c: prf(sum(t == c and p == c for t, p in rows), sum(t != c and p == c for t, p in rows),
               sum(t == c and p != c for t, p in rows)) for c in classes}
    confusion: dict[str, dict[str, int]] = {c: {} for c in classes}
    for t, p in rows:
        confusion[t][str(p)] = confusion[t].get(str(p), 0) + 1
    report["category_confusion"] = {t: v for t, v in confusion.items() if v}
    flagged = [(t.category, p.category) for t, p in pairs
               if not t.safe and t.category and not p.safe]
    report["category_accuracy_on_flagged"] = round(
        sum(t == p for t, p in flagged) / max(len(flagged), 1), 4)
    return report
