"""The shared safety-classification report, on cases worked out by hand."""
from __future__ import annotations

import pytest

from megatron_srp.reflection.scores import Verdict, classification_report, prf

S = Verdict(True)


def U(category=None):
    return Verdict(False, category)


def test_a_small_confusion_worked_out_by_hand() -> None:
    truth = [S, S, S, S, S, U("S1"), U("S1"), U("S2"), U("S2"), U("S10")]
    pred = [S, S, S, U("S1"), S, U("S1"), U("S2"), U("S2"), S, U("S10")]
    r = classification_report(truth, pred)
    # Unsafe as positive: tp 4 (rows 6-8, 10), fn 1 (row 9), fp 1 (row 4), tn 4.
    assert r["confusion"] == {"true_safe": {"pred_safe": 4, "pred_unsafe": 1},
                              "true_unsafe": {"pred_safe": 1, "pred_unsafe": 4}}
    assert r["n"] == 10 and r["accuracy"] == 0.8
    assert r["balanced_accuracy"] == 0.8  # (4/5 + 4/5) / 2
    assert r["per_class"]["unsafe"] == {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5}
    assert r["per_class"]["safe"] == {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5}
    # Categories, "safe" a class: S1 predicted for rows 4, 6 (right once) and true for 6, 7.
    assert list(r["per_category"]) == ["safe", "S1", "S2", "S10"]
    assert r["per_category"]["S1"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # S2: predicted for rows 7, 8; right on 8; true on 8, 9.
    assert r["per_category"]["S2"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_category"]["S10"]["f1"] == 1.0
    assert r["category_confusion"]["S1"] == {"S1": 1, "S2": 1}
    assert r["category_confusion"]["S2"] == {"S2": 1, "safe": 1}
    # Flagged unsafe with a true category: rows 6, 7, 8, 10; category right on 6, 8, 10.
    assert r["category_accuracy_on_flagged"] == 0.75


def test_perfect_and_all_safe_predictions() -> None:
    truth = [S, U("S2"), U("S2"), S]
    assert classification_report(truth, truth)["accuracy"] == 1.0
    r = classification_report(truth, [S] * 4)
    assert r["accuracy"] == 0.5 and r["balanced_accuracy"] == 0.5
    assert r["per_class"]["unsafe"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_categories_outside_the_taxonomy_sort_last() -> None:
    r = classification_report([U("zz"), U("S3"), S], [U("zz"), U("aa"), S])
    assert list(r["per_category"]) == ["safe", "S3", "aa", "zz"]


def test_prf_and_errors() -> None:
    assert prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert prf(1, 1, 2)["f1"] == round(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3), 4)
    with pytest.raises(ValueError, match="no verdicts"):
        classification_report([], [])
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        classification_report([S, S], [S])
