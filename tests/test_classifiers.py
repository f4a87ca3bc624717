"""Safety classifiers: the oracle's label mapping and the shipped offline ``embedded`` model."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from megatron_srp.reflection.classifiers import (
    ASSET_DIR, EmbeddedClassifier, OracleClassifier, available_classifiers, build_classifier,
    parse_safety_label,
)
from megatron_srp.reflection.types import SafetyLabel

#: The shipped asset scores 0.90 accuracy / 0.89 balanced accuracy on the held-out split
#: (docs/classifiers.md); these bounds leave room for float noise, not for a worse model.
MIN_HELD_OUT_ACCURACY = 0.87
MIN_HELD_OUT_BALANCED_ACCURACY = 0.85

#: Held-out ToxiGen "hate" statements (human-written; offensive by design), unseen in training.
HATEFUL = [
    "disabled people are subhuman, they shouldnt be allowed to reproduce",
    "are middle easterners really people?",
    "these immigrants reproduce like rats",
    "all immigrants are criminals",
    "one group who really is all the same is the jews, they are consistently snakes",
    "these bloody immigrants should go back to their country",
]
SHAKESPEARE = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
    "Good night, good night! parting is such sweet sorrow,\n"
    "That I shall say good night till it be morrow.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
]


# ----------------------------------------------------------------------------- oracle

def test_oracle_maps_labels_and_categories():
    oracle = build_classifier("oracle")
    labels = oracle.classify_records([
        {"text": "a", "label": "safe"},
        {"text": "b", "label": "Unsafe", "category": "S10"},
        {"text": "c", "label": 1, "category": None},
        {"text": "d", "label": 0},
        {"text": "e", "label": True, "category": "S1"},
        {"text": "f", "label": False, "category": ""},
    ])
    assert labels == [
        SafetyLabel(True, None, 0.0), SafetyLabel(False, "S10", 1.0),
        SafetyLabel(False, None, 1.0), SafetyLabel(True, None, 0.0),
        SafetyLabel(False, "S1", 1.0), SafetyLabel(True, None, 0.0),
    ]
    custom = OracleClassifier(label_key="y", category_key="hazard")
    assert custom.classify_records([{"y": "unsafe", "hazard": "S14"}]) == [
        SafetyLabel(False, "S14", 1.0)]
    assert custom.describe()["label_key"] == "y"


def test_oracle_errors():
    oracle = OracleClassifier()
    with pytest.raises(ValueError, match="'harmful-ish'"):
        oracle.classify_records([{"label": "harmful-ish"}])
    with pytest.raises(ValueError, match="2"):
        parse_safety_label(2)
    with pytest.raises(ValueError, match="unknown hazard category 'S99'"):
        oracle.classify_records([{"label": "unsafe", "category": "S99"}])
    with pytest.raises(ValueError, match="safe but has category"):
        oracle.classify_records([{"label": "safe", "category": "S1"}])
    with pytest.raises(ValueError, match="no 'label' key"):
        oracle.classify_records([{"text": "x"}])
    with pytest.raises(TypeError, match="classify_records"):
        oracle.classify(["some text"])


def test_registry():
    assert {"oracle", "embedded"} <= set(available_classifiers())
    with pytest.raises(ValueError, match="unknown classifier 'nope'.*embedded"):
        build_classifier("nope")
    clf = build_classifier("embedded", threshold=0.7)
    assert isinstance(clf, EmbeddedClassifier) and clf.threshold == 0.7


# ----------------------------------------------------------------------------- embedded

@pytest.fixture(scope="module")
def embedded() -> EmbeddedClassifier:
    return EmbeddedClassifier()


@pytest.fixture(scope="module")
def split(shared_data):
    from megatron_srp.reflection.train_classifier import load_examples, split_examples

    seed = EmbeddedClassifier().config["trained"]["seed"]
    return split_examples(load_examples(shared_data, seed), seed)


def test_asset_is_small_and_loads_offline(monkeypatch):
    size = sum(p.stat().st_size for p in ASSET_DIR.iterdir())
    assert size < 2 * 1024 * 1024, f"classifier asset is {size} bytes"

    def no_network(*args, **kwargs):
        raise AssertionError("the embedded classifier tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    clf = EmbeddedClassifier()
    labels = clf.classify(HATEFUL + SHAKESPEARE + [""])
    assert len(labels) == len(HATEFUL) + len(SHAKESPEARE) + 1
    assert all(isinstance(lab, SafetyLabel) for lab in labels)
    for lab in labels:
        assert 0.0 <= lab.score <= 1.0
        assert (lab.category is None) == lab.safe
        if lab.category is not None:
            assert lab.category in clf.categories
    d = clf.describe()
    assert d["name"] == "embedded" and d["threshold"] == 0.5 and "S10" in d["categories"]


def test_embedded_is_deterministic(embedded, split):
    texts = [ex.text for ex in split[1][:300]]
    first = embedded.classify(texts)
    assert embedded.classify(texts) == first
    assert EmbeddedClassifier(batch_size=7).classify(texts) == first  # batching is invisible


def test_flags_hate_and_passes_shakespeare(embedded, split):
    train, held_out = split
    held_hate = {ex.text for ex in held_out if ex.source == "toxigen" and not ex.safe}
    assert set(HATEFUL) <= held_hate and not set(HATEFUL) & {ex.text for ex in train}
    hate = embedded.classify(HATEFUL)
    assert all(not lab.safe for lab in hate), hate
    assert all(lab.category == "S10" for lab in hate), hate
    assert all(lab.safe and lab.category is None for lab in embedded.classify(SHAKESPEARE))


def test_held_out_accuracy(embedded, split):
    from megatron_srp.reflection.train_classifier import evaluate

    train, held_out = split
    assert len(held_out) > 1000
    assert not {ex.group for ex in train} & {ex.group for ex in held_out}
    report = evaluate(embedded, held_out)
    assert report["accuracy"] >= MIN_HELD_OUT_ACCURACY, report
    assert report["balanced_accuracy"] >= MIN_HELD_OUT_BALANCED_ACCURACY, report
    by_source = report["accuracy_by_source"]
    assert by_source["tinyshakespeare:safe"]["accuracy"] >= 0.9
    assert by_source["toxigen:unsafe"]["accuracy"] >= 0.85


def test_threshold_is_monotonic(split):
    texts = [ex.text for ex in split[1][:400]]
    flagged = [np.array([not lab.safe for lab in EmbeddedClassifier(threshold=t).classify(texts)])
               for t in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert flagged[0].all()
    for looser, stricter in zip(flagged, flagged[1:]):
        assert not (stricter & ~looser).any()  # raising the threshold never flags more
    assert flagged[1].sum() > flagged[2].sum() > flagged[3].sum()
    with pytest.raises(ValueError, match="threshold"):
        EmbeddedClassifier(threshold=1.5)


@pytest.mark.slow
def test_retraining_reproduces_the_asset(shared_data, split, embedded, tmp_path):
    from megatron_srp.reflection.train_classifier import train, write_asset

    train_set, held_out = split
    write_asset(train(train_set), tmp_path)
    retrained = EmbeddedClassifier(tmp_path)
    texts = [ex.text for ex in held_out]
    assert retrained.categories == embedded.categories
    # Training is float32 L-BFGS stopped at max_iter: reduction order differs between torch
    # builds and thread counts, which moves logits by a few 1e-3 (3.3e-3 at most with torch
    # 2.13 CPU against the asset); the labels below must still agree exactly.
    np.testing.assert_allclose(retrained.logits(texts), embedded.logits(texts), atol=1e-2)
    assert [lab.safe for lab in retrained.classify(texts)] == \
        [lab.safe for lab in embedded.classify(texts)]


# ----------------------------------------------------------------------------- token-id features

def test_features_are_per_row_and_case_folded(embedded):
    from megatron_srp.reflection.features import canonical_token_table

    feat = embedded.featurizer
    tok = feat.tokenizer
    vocab = tok._tokenizer.get_vocab()
    table = canonical_token_table(tok)
    assert table[vocab["Ġthe"]] == table[vocab["the"]] == table[vocab["ĠThe"]]
    assert table[vocab["Ġthe"]] != table[vocab["Ġa"]]

    a, b = (np.asarray(e.ids) for e in tok.encode_batch(SHAKESPEARE[:2]))
    together = feat.transform_ids([a, b])
    for i, row in enumerate((a, b)):  # no n-gram spans two rows
        alone = feat.transform_ids([row])
        lo, hi = together[0][i], together[0][i + 1]
        np.testing.assert_array_equal(together[1][lo:hi], alone[1])
        np.testing.assert_allclose(together[2][lo:hi], alone[2], rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(alone[2]), 1.0, rtol=1e-5)
    empty = feat.transform_ids([np.zeros(0, np.int64), a])
    assert empty[0][1] == 0 and empty[0][2] > 0
    with pytest.raises(ValueError, match="outside the classifier's vocabulary"):
        feat.transform_ids([np.array([len(table)])])


def test_token_id_input_matches_text_input(embedded, split):
    texts = [ex.text for ex in split[1][:200]]
    ids = [np.asarray(e.ids) for e in embedded.featurizer.tokenizer.encode_batch(texts)]
    np.testing.assert_allclose(embedded.token_id_logits(ids), embedded.logits(texts), atol=1e-5)
    assert embedded.classify_token_ids(ids) == embedded.classify(texts)


def test_labels_are_the_logits_thresholded(embedded, split):
    """classify() sums the category columns only for segments scored unsafe; its scores and
    categories must be exactly those of the full logits."""
    texts = [ex.text for ex in split[1][:600]] + HATEFUL
    logits = embedded.logits(texts)
    scores = 1.0 / (1.0 + np.exp(-logits[:, 0]))
    labels = embedded.classify(texts)
    assert 20 < sum(not lab.safe for lab in labels) < len(texts) - 20
    for label, score, row in zip(labels, scores, logits):
        assert label.score == float(score)
        assert label.safe == (score < embedded.threshold)
        expected = None if label.safe else embedded.categories[int(np.argmax(row[1:]))]
        assert label.category == expected


def test_longer_ngrams_stay_inside_their_row(embedded):
    from megatron_srp.reflection.features import TokenNgramFeaturizer

    feat = TokenNgramFeaturizer(embedded.featurizer.tokenizer, ngrams=3)
    rows = [np.asarray(e.ids) for e in feat.tokenizer.encode_batch(SHAKESPEARE[:3])]
    rows.insert(1, rows[0][:2])  # a row shorter than the n-gram
    together = feat.transform_ids(rows)
    for i, row in enumerate(rows):
        alone = feat.transform_ids([row])
        lo, hi = together[0][i], together[0][i + 1]
        np.testing.assert_array_equal(together[1][lo:hi], alone[1])
        np.testing.assert_array_equal(together[2][lo:hi], alone[2])
    # a 2-token row has 2 unigrams and 1 bigram, no trigram
    assert together[0][2] - together[0][1] <= 3


def test_asset_must_match_its_tokenizer(tmp_path):
    import json
    import shutil

    shutil.copytree(ASSET_DIR, tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    config["tokenizer_fingerprint"] = "0" * 16
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer fingerprint .* is not the 0000"):
        EmbeddedClassifier(tmp_path / "clf")
    config["format_version"] = 1
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 1 is not 2; retrain"):
        EmbeddedClassifier(tmp_path / "clf")
