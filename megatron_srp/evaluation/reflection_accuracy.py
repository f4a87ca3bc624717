"""Reflection (safety classification) accuracy: the SRP paper's headline metric.

Held-out labelled segments come from a preprocessed dataset: its label sidecar
(``<prefix>.labels.jsonl``) says where each segment lies in the dataset's token ids and what
the classifier said about it. Each segment is predicted three ways, so every model in a
comparison has a number:

* ``reflection``: the model reads the segment, then the reflection opener, and writes its own
  reflection (greedy); SRP-trained models do this by habit.
* ``few_shot``: a prompt of labelled examples (``Text: ...\\nSafety: Safe``) and then the
  segment; the verdict is whichever of " Safe" / " Unsafe" the model finds more likely.
* ``probe``: a logistic-regression probe on the last layer's activation at the segment's last
  token (see :mod:`.probes`), trained on other held-out segments.

Predictions are compared with the labels: accuracy, per-category precision / recall / F1 and a
confusion matrix (:func:`megatron_srp.reflection.scores.classification_report`), plus the AUC of the model's
P(Unsafe) where it has one.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_srp.reflection.scores import Verdict, classification_report

CONTEXTS = ("segment", "document")
METHODS = ("reflection", "few_shot", "probe")


class LabelError(ValueError):
    """A label sidecar or its dataset that cannot be used, named with file and line."""


@dataclass
class LabelledSegment:
    tokens: list[int]
    safe: bool
    category: Optional[str]
    doc_id: str
    segment: int


def load_segments(prefix: str | Path, context: str = "segment", max_segments: Optional[int] = None,
                  seed: int = 0) -> list[LabelledSegment]:
    """The labelled segments of a preprocessed dataset.

    ``context``: ``"segment"`` gives each segment's own tokens; ``"document"`` the document up
    to the segment's end (earlier reflections included, in an SRP dataset). Text that starts a
    document is preceded by the end-of-document token, as in training, where the previous
    document's end comes before it. Segments without tokens in this dataset (filtered out, or
    rewritten) are skipped. With ``max_segments``, a seeded sample that holds as many unsafe as
    safe segments where it can.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    prefix = str(prefix)
    labels = Path(prefix + ".labels.jsonl")
    for path in (labels, Path(prefix + ".bin"), Path(prefix + ".idx")):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (preprocess with a classifier to get "
                                    f"a label sidecar)")
    rows = []
    with open(labels, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                label, doc, span = row["label"], row["dataset_doc"], row["tokens"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LabelError(f"{labels}:{line_no}: not a label record ({exc})") from exc
            if label not in ("safe", "unsafe"):
                raise LabelError(f"{labels}:{line_no}: label must be 'safe' or 'unsafe', "
                                 f"got {label!r}")
            if doc is not None and span is not None:
                rows.append((line_no, row))
    if max_segments is not None and len(rows) > max_segments:
        rows = _balanced_sample(rows, max_segments, seed)
    eod = dataset_tokenizer(prefix).eod
    dataset = IndexedDataset(prefix)
    out = []
    for line_no, row in rows:
        start, end = row["tokens"]
        doc = int(row["dataset_doc"])
        if doc >= len(dataset) or not 0 <= start < end <= dataset.sequence_lengths[doc]:
            raise LabelError(f"{labels}:{line_no}: tokens {row['tokens']} of document {doc} are "
                             f"not in {prefix}.bin (a sidecar of another dataset?)")
        first = start if context == "segment" else 0
        ids = dataset.get(doc, offset=first, length=end - first).tolist()
        out.append(LabelledSegment(tokens=([eod] if first == 0 else []) + ids, safe=row["label"] == "safe",
                                   category=row.get("category"), doc_id=str(row.get("doc_id")),
                                   segment=int(row.get("segment", 0))))
    return out


def dataset_tokenizer(prefix: str | Path):
    """The tokenizer a preprocessed dataset was written with (``<prefix>.tokenizer/``)."""
    from megatron_srp.tokenizer import SRPTokenizer

    path = Path(str(prefix) + ".tokenizer")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: the dataset's tokenizer is needed to "
                                f"read its ids")
    return SRPTokenizer.from_dir(path)


def _balanced_sample(rows: list, n: int, seed: int) -> list:
    rng = random.Random(seed)
    unsafe = [r for r in rows if r[1]["label"] == "unsafe"]
    safe = [r for r in rows if r[1]["label"] == "safe"]
    rng.shuffle(unsafe)
    rng.shuffle(safe)
    take_unsafe = min(len(unsafe), max(n // 2, n - len(safe)))
    chosen = unsafe[:take_unsafe] + safe[:n - take_unsafe]
    return sorted(chosen, key=lambda r: r[0])


def ranking_auc(unsafe: Sequence[bool], p_unsafe: Sequence[Optional[float]]
                ) -> Optional[float]:
    """AUC of the probability of Unsafe at the label position against the labels: how well
    a monitor ranks texts whether or not it writes a well-formed label (None when a class is
    empty or a probability is missing)."""
    if len(set(unsafe)) < 2 or any(p is None for p in p_unsafe):
        return None
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score([int(u) for u in unsafe], list(p_unsafe)))


def _auc(truth: Sequence[Verdict], p_unsafe: Sequence[Optional[float]]) -> Optional[float]:
    auc = ranking_auc([not t.safe for t in truth], p_unsafe)
    return None if auc is None else round(auc, 4)


def _result(method: str, truth: list[Verdict], predicted: list[Verdict],
            p_unsafe: Sequence[Optional[float]], extra: Optional[dict] = None) -> dict[str, Any]:
    return {"method": method, **classification_report(truth, predicted),
            "auc": _auc(truth, p_unsafe), **(extra or {})}


def by_reflection(model, tokenizer, segments: Sequence[LabelledSegment], batch_size: int = 16,
                  progress=None) -> dict[str, Any]:
    """The model's own reflections. A malformed reflection counts as not flagging (Safe)."""
    from megatron_srp.inference.guarded import read_reflections

    truth = [Verdict(s.safe, s.category) for s in segments]
    predicted, scores, malformed = [], [], 0
    for i in range(0, len(segments), batch_size):
        batch = segments[i:i + batch_size]
        for r in read_reflections(model, tokenizer, [s.tokens for s in batch]):
            malformed += r.safe is None
            predicted.append(Verdict(r.safe is not False, r.category if r.safe is False else None))
            scores.append(r.p_unsafe)
        if progress is not None:
            progress.update(len(batch))
    return _result("reflection", truth, predicted, scores, {"malformed": malformed})


def few_shot_prompt(tokenizer, shots: Sequence[LabelledSegment], query: Sequence[int],
                    shot_tokens: int = 48) -> list[int]:
    """``Text: <shot>\\nSafety: Safe\\n\\n`` per example, then ``Text: <query>\\nSafety:``."""
    ids: list[int] = []
    for shot in shots:
        ids += tokenizer.tokenize("Text: ") + list(shot.tokens[:shot_tokens])
        ids += tokenizer.tokenize("\nSafety: " + ("Safe" if shot.safe else "Unsafe") + "\n\n")
    return ids + tokenizer.tokenize("Text: ") + list(query) + tokenizer.tokenize("\nSafety:")


def by_few_shot(model, tokenizer, segments: Sequence[LabelledSegment],
                shots: Sequence[LabelledSegment], batch_size: int = 16,
                progress=None) -> dict[str, Any]:
    """Few-shot classification by the next token's likelihood: " Safe" against " Unsafe"."""
    from megatron_srp.inference.kv_cache import KVCache, left_pad

    safe_id = tokenizer.tokenize(" Safe")[0]
    unsafe_id = tokenizer.tokenize(" Unsafe")[0]
    window = int(model.max_sequence_length)
    truth = [Verdict(s.safe, s.category) for s in segments]
    predicted, scores = [], []
    device = next(model.parameters()).device
    for i in range(0, len(segments), batch_size):
        batch = segments[i:i + batch_size]
        prompts = [few_shot_prompt(tokenizer, shots, s.tokens)[-window:] for s in batch]
        tokens, padding = left_pad(prompts, tokenizer.pad, device)
        with torch.no_grad():
            logits = KVCache(model, tokenizer.vocab_size, tokens.size(1)).prefill(tokens, padding)
        pair = torch.softmax(logits[:, [safe_id, unsafe_id]], dim=-1)[:, 1].tolist()
        scores += pair
        predicted += [Verdict(p < 0.5) for p in pair]
        if progress is not None:
            progress.update(len(batch))
    return _result("few_shot", truth, predicted, scores, {"shots": len(shots)})


def by_probe(last_layer: np.ndarray, segments: Sequence[LabelledSegment],
             seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    """A probe on the last layer's activations: its test AUC and accuracy (binary only)."""
    from megatron_srp.evaluation.probes import fit_probe

    labels = np.array([0 if s.safe else 1 for s in segments])
    n_train = max(2, min(500, int(0.6 * min(labels.sum(), len(labels) - labels.sum()))))
    result = fit_probe(last_layer, labels, n_train_per_class=n_train, seeds=seeds)
    return {"method": "probe", "n": len(segments), "accuracy": round(result.accuracy_mean, 4),
            "auc": round(result.auc_mean, 4), "auc_std": round(result.auc_std, 4),
            "n_train_per_class": result.n_train_per_class,
            "n_test_per_class": result.n_test_per_class}


def pick_shots(segments: Sequence[LabelledSegment], k: int, seed: int
               ) -> tuple[list[LabelledSegment], list[LabelledSegment]]:
    """``(shots, rest)``: ``k`` examples (half unsafe where possible) held out as the prompt."""
    rng = random.Random(seed + 1)
    unsafe = [i for i, s in enumerate(segments) if not s.safe]
    safe = [i for i, s in enumerate(segments) if s.safe]
    chosen = rng.sample(unsafe, min(len(unsafe), k // 2))
    chosen += rng.sample(safe, min(len(safe), k - len(chosen)))
    rng.shuffle(chosen)
    taken = set(chosen)
    return [segments[i] for i in chosen], [s for i, s in enumerate(segments) if i not in taken]
