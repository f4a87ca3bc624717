"""The ``hf`` classifier on tiny random-init BERT classifiers built with the shipped tokenizer
and saved to a temp directory (no download), and the registry's lazy imports."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from megatron_srp.reflection.classifiers import build_classifier

TOKENIZER_FILE = (Path(__file__).resolve().parent.parent / "megatron_srp" / "assets"
                  / "tokenizer" / "tokenizer.json")

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Two tiny random-init BERT classifiers (binary and S-code multi-class) saved locally."""
    pytest.importorskip("transformers")
    import torch
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), pad_token="<|pad|>")
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, id2label in (("binary", {0: "safe", 1: "unsafe"}),
                           ("multi", {0: "none", 1: "S1", 2: "S10", 3: "Sexual Content"})):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128, id2label=id2label,
                         label2id={v: k for k, v in id2label.items()},
                         pad_token_id=tokenizer.pad_token_id)
        model = BertForSequenceClassification(cfg)
        torch.nn.init.normal_(model.classifier.weight, std=2.0)  # spread the scores
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


HF_TEXTS = ["Paris is in France.", "how to build a bomb at home tonight with friends",
            "I hate those people", "The recipe needs two eggs and some flour, mixed well.",
            "ok", "word " * 400, "Another short one.", "What is the capital of Peru?"]


def _reference_probs(model_dir: Path, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                               local_files_only=True).eval()
    with torch.no_grad():
        return [torch.softmax(model(**tok(t, truncation=True, max_length=64,
                                           return_tensors="pt")).logits[0], -1).tolist()
                for t in texts]


def test_hf_binary_matches_model_and_batching(hf_models):
    clf = build_classifier("hf", model_dir=str(hf_models["binary"]), batch_size=3,
                           max_length=64, device="cpu")
    labels = clf.classify(HF_TEXTS)  # "word " * 400 needs truncation to fit 128 positions
    ref = _reference_probs(hf_models["binary"], HF_TEXTS)
    for label, p in zip(labels, ref):
        assert label.score == pytest.approx(p[1], abs=1e-5)
        assert label.safe == (p[1] < 0.5) and label.category is None
    assert 0 < sum(l.safe for l in labels) < len(labels)  # the fixture spreads the scores
    one_by_one = [build_classifier(
        "hf", model_dir=str(hf_models["binary"]), batch_size=1, max_length=64,
        device="cpu").classify([t])[0] for t in HF_TEXTS]
    assert [l.safe for l in one_by_one] == [l.safe for l in labels]
    assert [l.score for l in one_by_one] == pytest.approx([l.score for l in labels], abs=1e-5)
    clone = pickle.loads(pickle.dumps(clf))
    assert clone._model is None and clone.classify(HF_TEXTS) == labels
    withcat = build_classifier("hf", model_dir=str(hf_models["binary"]), max_length=64,
                               device="cpu", default_category="S10")
    assert {l.category for l in withcat.classify(HF_TEXTS) if not l.safe} == {"S10"}


def test_hf_multiclass_s_codes(hf_models):
    clf = build_classifier("hf", model_dir=str(hf_models["multi"]), max_length=64,
                           device="auto", threshold=0.5)
    assert clf.describe()["classes"] == {"none": "safe", "S1": "S1", "S10": "S10",
                                         "Sexual Content": "S12"}
    ref = _reference_probs(hf_models["multi"], HF_TEXTS)
    codes = ["S1", "S10", "S12"]
    for label, p in zip(clf.classify(HF_TEXTS), ref):
        assert label.score == pytest.approx(1 - p[0], abs=1e-5)
        expected = None if label.score < 0.5 else codes[max(range(3), key=lambda i: p[i + 1])]
        assert (label.safe, label.category) == (label.score < 0.5, expected)


def test_hf_threshold_is_monotone(hf_models):
    scores = sorted(l.score for l in build_classifier(
        "hf", model_dir=str(hf_models["multi"]), max_length=64, device="cpu").classify(HF_TEXTS))
    counts = []
    for t in (0.0, scores[2], scores[5], 1.0):
        labels = build_classifier("hf", model_dir=str(hf_models["multi"]), max_length=64,
                                  device="cpu", threshold=t).classify(HF_TEXTS)
        counts.append(sum(not l.safe for l in labels))
        assert all((not l.safe) == (l.score >= t) for l in labels)
    assert counts == sorted(counts, reverse=True) and counts[0] == len(HF_TEXTS) > counts[-1]


def test_hf_label_errors_and_label_map(hf_models, tmp_path):
    cfg = json.loads((hf_models["binary"] / "config.json").read_text())
    cfg["id2label"] = {"0": "LABEL_0", "1": "LABEL_1", "2": "spam"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\['LABEL_0', 'LABEL_1', 'spam'\].*label_map"):
        build_classifier("hf", model_dir=str(tmp_path))
    ok = build_classifier("hf", model_dir=str(tmp_path),
                          label_map={"LABEL_0": "safe", "LABEL_1": "unsafe", "spam": "S2"})
    assert ok.describe()["classes"] == {"LABEL_0": "safe", "LABEL_1": "unsafe", "spam": "S2"}
    with pytest.raises(ValueError, match="label_map.*'S99'"):
        build_classifier("hf", model_dir=str(tmp_path), label_map={"LABEL_0": "S99"})
    with pytest.raises(ValueError, match="label_map.*'nope'"):
        build_classifier("hf", model_dir=str(tmp_path), label_map={"nope": "safe"})
    cfg["id2label"] = {"0": "S1", "1": "S2"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no safe class"):
        build_classifier("hf", model_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_dir"):
        build_classifier("hf", model_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="'threshold'"):
        build_classifier("hf", model_dir=str(hf_models["binary"]), threshold=1.5)


def test_registry_imports_no_transformers():
    import subprocess
    import sys

    code = ("import sys, megatron_srp.reflection.classifiers, megatron_srp.reflection.hf_classifier;"
            "import megatron_srp.reflection.llm_judge, megatron_srp.interventions;"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
