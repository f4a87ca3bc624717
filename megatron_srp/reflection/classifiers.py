"""Safety classifiers that attach a :class:`SafetyLabel` to each segment text.

Two are built in:

* ``oracle`` (:class:`OracleClassifier`): the labels are already in the input records (labelled
  corpora such as ToxiGen or Do-Not-Answer); it only validates and converts them.
* ``embedded`` (:class:`EmbeddedClassifier`): the offline default. A small model shipped in the
  package at ``megatron_srp/assets/classifier/`` (hashed n-grams of token ids, a logistic
  unsafe head and a softmax category head, about 1 MB) that runs in numpy on the CPU and never
  touches the network. It is trained by :mod:`megatron_srp.reflection.train_classifier`
  (``tools/train_classifier.py``); see ``docs/classifiers.md`` for how and how well.

It is a stand-in for a real guard model. Two real ones are registered too, imported only
when built (so this module needs neither transformers nor an endpoint):

* ``hf`` (:class:`megatron_srp.reflection.hf_classifier.HFClassifier`): a local Hugging Face
  sequence-classification model, its classes mapped through ``config.id2label``.
* ``llm-judge`` (:class:`megatron_srp.reflection.llm_judge.LLMJudgeClassifier`): an LLM behind
  an OpenAI-compatible endpoint (vLLM), prompted Llama Guard style or with a 0-5 rubric.

More join through :func:`register_classifier`; everything downstream picks a classifier by
name with :func:`build_classifier`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from megatron_srp.reflection.features import CSR, TokenNgramFeaturizer, csr_rows, sparse_matmul
from megatron_srp.reflection.types import SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "classifier"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.npz"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 2

_SAFE_STRINGS = {"safe", "0", "false"}
_UNSAFE_STRINGS = {"unsafe", "1", "true"}


def parse_safety_label(value: Any) -> bool:
    """``True`` if the label means safe.

    Accepts "safe"/"unsafe" (any case, also "0"/"1"/"true"/"false"), 0/1 and booleans. Numbers and
    booleans are read as an "is unsafe" flag, the way Do-Not-Answer's ``harmful`` column is:
    1 / True = unsafe, 0 / False = safe.
    """
    if isinstance(value, (bool, np.bool_)):
        return not bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return value == 0
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _SAFE_STRINGS:
            return True
        if key in _UNSAFE_STRINGS:
            return False
    raise ValueError(
        f"unknown safety label {value!r}: expected 'safe'/'unsafe', a boolean (True = unsafe) "
        "or 0/1 (1 = unsafe)"
    )


class OracleClassifier:
    """Reads labels that are already in the input records.

    ``classify_records([{"text": ..., "label": "unsafe", "category": "S10"}, ...])``. The
    label may be "safe"/"unsafe", a boolean (True = unsafe) or 0/1 (1 = unsafe); the category
    must be a code of the taxonomy, or None/absent/"" (and it must be None for safe records).
    Scores are 1.0 for unsafe and 0.0 for safe.
    """

    name = "oracle"

    def __init__(self, label_key: str = "label", category_key: str = "category",
                 taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> None:
        self.label_key = label_key
        self.category_key = category_key
        self.taxonomy = taxonomy

    def classify_records(self, records: Sequence[Mapping[str, Any]]) -> list[SafetyLabel]:
        labels = []
        for i, record in enumerate(records):
            if self.label_key not in record:
                raise ValueError(f"record {i} has no {self.label_key!r} key: {dict(record)!r}")
            try:
                safe = parse_safety_label(record[self.label_key])
            except ValueError as exc:
                raise ValueError(f"record {i}: {exc}") from exc
            category = record.get(self.category_key)
            if category == "":
                category = None
            if category is not None:
                if safe:
                    raise ValueError(f"record {i} is safe but has category {category!r}")
                try:
                    self.taxonomy.validate(category)
                except ValueError as exc:
                    raise ValueError(f"record {i}: {exc}") from exc
            labels.append(SafetyLabel(safe=safe, category=category, score=0.0 if safe else 1.0))
        return labels

    def classify(self, texts: Sequence[str]) -> list[SafetyLabel]:
        raise TypeError(
            "the oracle classifier reads labels from records, not from text: call "
            f"classify_records(records) with dicts holding {self.label_key!r} and "
            f"{self.category_key!r} keys (or use a model classifier such as 'embedded')"
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label_key": self.label_key,
                "category_key": self.category_key, "taxonomy": self.taxonomy.name}


# ----------------------------------------------------------------------------- embedded model

class EmbeddedClassifier:
    """The shipped offline classifier (see the module docstring and ``docs/classifiers.md``).

    ``score`` is P(unsafe) from the logistic head; ``score >= threshold`` means unsafe, and then
    the category head picks one of the taxonomy codes it was trained on (None for safe).

    Its features are n-grams of token ids (:mod:`megatron_srp.reflection.features`), so the
    asset carries the tokenizer it was trained with (``tokenizer/``). Callers that already hold
    ids from that tokenizer (``tokenizer_fingerprint`` tells) call :meth:`classify_token_ids`
    and skip tokenising again; preprocessing does.
    """

    name = "embedded"

    def __init__(self, asset_dir: str | Path | None = None, threshold: float = 0.5,
                 batch_size: int = 256, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> None:
        from megatron_srp.tokenizer import SRPTokenizer

        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.asset_dir = Path(asset_dir) if asset_dir is not None else ASSET_DIR
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self.taxonomy = taxonomy
        config_path = self.asset_dir / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no classifier asset at {self.asset_dir} ({CONFIG_FILE} missing); build it "
                "with tools/train_classifier.py"
            )
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        if self.config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {self.config.get('format_version')}"
                             f" is not {FORMAT_VERSION}; retrain with tools/train_classifier.py")
        self.categories: tuple[str, ...] = tuple(self.config["categories"])
        for code in self.categories:
            taxonomy.validate(code)
        tokenizer = SRPTokenizer.from_dir(self.asset_dir / TOKENIZER_SUBDIR)
        expected = self.config.get("tokenizer_fingerprint")
        if tokenizer.fingerprint != expected:
            raise ValueError(f"{self.asset_dir / TOKENIZER_SUBDIR}: tokenizer fingerprint "
                             f"{tokenizer.fingerprint} is not the {expected} the weights were "
                             "trained with")
        self.tokenizer_fingerprint = tokenizer.fingerprint
        self.featurizer = TokenNgramFeaturizer(tokenizer, **self.config["features"])
        with np.load(self.asset_dir / WEIGHTS_FILE) as data:
            # column 0: unsafe logit; columns 1..K: category logits
            self.weights = np.concatenate(
                [data["unsafe_w"][:, None], data["category_w"]], axis=1).astype(np.float32)
            self.bias = np.concatenate([data["unsafe_b"], data["category_b"]]).astype(np.float64)
        if self.weights.shape != (self.featurizer.dim, 1 + len(self.categories)):
            raise ValueError(f"{self.asset_dir}: weights have shape {self.weights.shape}, "
                             f"expected ({self.featurizer.dim}, {1 + len(self.categories)})")

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw ``(n, 1 + K)`` logits: column 0 unsafe, then one per category."""
        return self._logits(texts, self.featurizer.transform)

    def token_id_logits(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """:meth:`logits` for texts already encoded with the classifier's tokenizer."""
        return self._logits(rows, self.featurizer.transform_ids)

    def _logits(self, items: Sequence, transform: Callable) -> np.ndarray:
        out = [sparse_matmul(*csr, self.weights) + self.bias
               for csr in self._batches(items, transform)]
        return np.concatenate(out) if out else np.zeros((0, 1 + len(self.categories)))

    def _batches(self, items: Sequence, transform: Callable) -> Iterator[CSR]:
        """The features of ``items``, ``batch_size`` rows at a time."""
        for start in range(0, len(items), self.batch_size):
            yield transform(items[start:start + self.batch_size])

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """P(unsafe) per text."""
        return 1.0 / (1.0 + np.exp(-self.logits(texts)[:, 0]))

    def classify(self, texts: Sequence[str]) -> list[SafetyLabel]:
        if isinstance(texts, str):
            raise TypeError("classify takes a sequence of texts, not one string")
        return self._labels(list(texts), self.featurizer.transform)

    def classify_token_ids(self, rows: Sequence[np.ndarray]) -> list[SafetyLabel]:
        """:meth:`classify` for segments given as token ids of ``tokenizer_fingerprint``'s
        tokenizer (for a segment cut from a longer text: its slice of the text's ids)."""
        return self._labels(rows, self.featurizer.transform_ids)

    def _labels(self, items: Sequence, transform: Callable) -> list[SafetyLabel]:
        """Scores from the unsafe column for every item; the category columns only for the
        items scored unsafe (each column is its own sum: the values :meth:`logits` gives)."""
        labels = []
        for csr in self._batches(items, transform):
            unsafe_logit = sparse_matmul(*csr, self.weights[:, :1])[:, 0]
            scores = 1.0 / (1.0 + np.exp(-(unsafe_logit + self.bias[0])))
            unsafe = scores >= self.threshold
            category = np.zeros(len(scores), dtype=np.int64)
            if unsafe.any():
                logits = sparse_matmul(*csr_rows(*csr, np.flatnonzero(unsafe)), self.weights)
                category[unsafe] = np.argmax(logits[:, 1:] + self.bias[1:], axis=1)
            labels += [SafetyLabel(safe=not flag, score=score,
                                   category=self.categories[cat] if flag else None)
                       for score, flag, cat in zip(scores.tolist(), unsafe.tolist(),
                                                   category.tolist())]
        return labels

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "asset_dir": str(self.asset_dir),
                "threshold": self.threshold, "batch_size": self.batch_size,
                "categories": list(self.categories), "features": self.featurizer.config(),
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "trained": self.config.get("trained", {})}


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_classifier(name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
    """Make ``build_classifier(name, **options)`` call ``factory(**options)``."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"classifier {name!r} is already registered")
    _REGISTRY[name] = factory


def available_classifiers() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_classifier(name: str, **options: Any):
    """A classifier by registry name ("oracle", "embedded", ...) built with ``options``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown classifier {name!r}; available: "
                         f"{', '.join(available_classifiers())}") from None
    return factory(**options)


register_classifier("oracle", OracleClassifier)
register_classifier("embedded", EmbeddedClassifier)


def _hf_classifier(**options: Any):
    from megatron_srp.reflection.hf_classifier import HFClassifier
    return HFClassifier(**options)


def _llm_judge_classifier(**options: Any):
    from megatron_srp.reflection.llm_judge import LLMJudgeClassifier
    return LLMJudgeClassifier(**options)


register_classifier("hf", _hf_classifier)
register_classifier("llm-judge", _llm_judge_classifier)
