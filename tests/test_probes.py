"""Linear probes: a planted direction is recovered, chance stays chance, the splits are
balanced and disjoint, and the activations are the ones the model computes."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_srp.evaluation.probes import balanced_split, fit_probe, probe_layers


def _planted(margin: float, n: int = 2000, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    labels = (rng.random(n) < 0.5).astype(int)
    features = rng.normal(size=(n, dim)) + margin * labels[:, None] * direction
    return features, labels


def test_a_planted_direction_is_recovered_and_chance_stays_chance() -> None:
    features, labels = _planted(margin=4.0)
    strong = fit_probe(features, labels)
    assert strong.auc_mean > 0.97 and strong.accuracy_mean > 0.9
    assert strong.n_train_per_class == 500 and len(strong.aucs) == 5
    weak = fit_probe(*_planted(margin=0.6))
    assert 0.55 < weak.auc_mean < strong.auc_mean
    shuffled = fit_probe(features, np.random.default_rng(1).permutation(labels))
    assert 0.4 < shuffled.auc_mean < 0.6


def test_results_are_deterministic_and_std_is_the_population_one() -> None:
    features, labels = _planted(margin=1.0)
    a, b = fit_probe(features, labels, seeds=(3, 4, 5)), fit_probe(features, labels,
                                                                 seeds=(3, 4, 5))
    assert a.aucs == b.aucs
    assert a.auc_std == pytest.approx(np.std(a.aucs, ddof=0))
    assert a.auc_mean == pytest.approx(np.mean(a.aucs))


def test_splits_are_balanced_and_disjoint() -> None:
    labels = np.array([1] * 120 + [0] * 400)
    for seed in range(4):
        train, test = balanced_split(labels, 50, seed, max_test_per_class=30)
        assert labels[train].sum() == 50 and len(train) == 100
        assert labels[test].sum() == 30 and len(test) == 60
        assert not set(train) & set(test)
    # Too few unsafe examples for 500 per class: training shrinks and leaves some to test.
    features = np.random.default_rng(0).normal(size=(520, 8))
    small = fit_probe(features, labels, n_train_per_class=500, seeds=(0,))
    assert small.n_train_per_class == 96 and small.n_test_per_class == 24


def test_bad_input() -> None:
    features = np.zeros((10, 3))
    with pytest.raises(ValueError, match="at least 4 examples"):
        fit_probe(features, np.array([1, 1, 1] + [0] * 7))
    with pytest.raises(ValueError, match="0 \\(safe\\) or 1"):
        fit_probe(features, np.arange(10))
    with pytest.raises(ValueError, match="do not match"):
        fit_probe(features, np.zeros(9))
    assert probe_layers(1) == {"first": 0, "middle": 0, "last": 0}
    assert probe_layers(30) == {"first": 0, "middle": 15, "last": 29}


def test_activations_are_the_models_own(inference_checks) -> None:
    acts = inference_checks["activations"]
    # The last layer's activation, through the final norm and the output layer, gives the
    # model's last-token logits: the hooks capture the right tensors.
    assert acts["logits_err"] < 1e-5
    assert acts["padding_err"] < 1e-5  # right padding in a batch changes nothing
    assert acts["first_vs_last"] > 1e-3 and acts["shape"] == [3, 128]
    assert acts["middle_vs_others"] > 1e-3  # 4 layers: first 0, middle 2, last 3


def test_long_and_empty_sequences_and_hooks(inference_checks) -> None:
    acts = inference_checks["activations"]
    assert acts["long_len"] > 128  # longer than the model's window
    assert acts["truncation_err"] < 1e-5  # ...so only its last 128 tokens count
    assert acts["empty_error"] is not None and "sequence 1" in acts["empty_error"]
    assert acts["hooks_left"] == 0
