"""``hf``: any local Hugging Face sequence-classification model as a safety classifier.

Real guard models (toxicity or harm classifiers fine-tuned from BERT-, RoBERTa- or Llama-style
backbones) ship as a directory with ``config.json``, weights and a tokenizer. This wraps one
(``AutoModelForSequenceClassification`` + ``AutoTokenizer``, ``local_files_only=True``: it never
downloads) and maps its classes onto :class:`SafetyLabel` through ``config.id2label``:

* each class name is read as ``safe`` (safe, benign, none, harmless, neutral), ``unsafe``
  (unsafe, harmful, toxic) or a taxonomy category (a code such as ``S10`` or a name such as
  ``Hate`` / ``violent_crimes``, case-insensitive); ``label_map`` overrides any of them;
* ``score = 1 - P(safe classes)`` (binary: P(unsafe)); when ``score >= threshold`` the category
  is the most probable category class, else ``default_category`` (None unless set);
* a one-logit model is read as sigmoid = P(unsafe); a ``multi_label_classification`` model
  (independent sigmoids) scores ``max P`` over its unsafe and category classes.

Classes that cannot be mapped (e.g. the default ``LABEL_0``) are a ``ValueError`` listing all
of them. The mapping is checked from ``config.json`` at construction; transformers is imported
and the weights loaded only on the first ``classify`` (in the worker), so the package imports,
and this object pickles, without transformers.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from megatron_srp.reflection.types import SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy

SAFE_NAMES = frozenset({"safe", "benign", "none", "harmless", "neutral", "not_unsafe"})
UNSAFE_NAMES = frozenset({"unsafe", "harmful", "toxic"})
SAFE, UNSAFE = "safe", "unsafe"


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-&]+", " ", str(name)).strip().lower()


def map_labels(id2label: Mapping[int, str], taxonomy: Taxonomy = DEFAULT_TAXONOMY,
               label_map: Optional[Mapping[str, str]] = None) -> dict[int, str]:
    """Class id -> ``"safe"``, ``"unsafe"`` or a taxonomy code (see the module docstring)."""
    label_map = dict(label_map or {})
    by_name = {_norm(c.name): c.code for c in taxonomy}
    by_code = {c.lower(): c for c in taxonomy.codes}

    def target(value: str) -> Optional[str]:
        key = _norm(value)
        if key in {_norm(n) for n in SAFE_NAMES}:
            return SAFE
        if key in UNSAFE_NAMES:
            return UNSAFE
        return by_code.get(key) or by_name.get(key)

    for name, value in label_map.items():
        if target(value) is None:
            raise ValueError(f"hf option 'label_map': {name!r} -> {value!r} is not 'safe', "
                             f"'unsafe' or a category of taxonomy {taxonomy.name!r} "
                             f"({', '.join(taxonomy.codes)})")
    unknown = sorted(set(label_map) - set(id2label.values()))
    if unknown:
        raise ValueError(f"hf option 'label_map' names {unknown}, which are not classes of the "
                         f"model; its classes are {[id2label[i] for i in sorted(id2label)]}")
    mapping = {i: target(label_map.get(name, name)) for i, name in id2label.items()}
    bad = [id2label[i] for i in sorted(mapping) if mapping[i] is None]
    if bad:
        raise ValueError(
            f"hf model classes {bad} cannot be mapped to safe/unsafe or a taxonomy category; "
            f"the model's classes are {[id2label[i] for i in sorted(id2label)]}. Pass option "
            "'label_map', e.g. {'LABEL_0': 'safe', 'LABEL_1': 'unsafe'} or {'LABEL_3': 'S10'}")
    return {i: v for i, v in mapping.items() if v is not None}


class HFClassifier:
    """A local Hugging Face sequence classifier (see the module docstring). Picklable."""

    name = "hf"

    def __init__(self, model_dir: str | Path, threshold: float = 0.5, batch_size: int = 32,
                 max_length: int = 512, device: str = "auto",
                 label_map: Optional[Mapping[str, str]] = None,
                 default_category: Optional[str] = None,
                 taxonomy: Taxonomy | str | None = None) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"hf option 'threshold' must be in [0, 1], got {threshold!r}")
        for key, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"hf option {key!r} must be an integer >= 1, got {value!r}")
        if isinstance(taxonomy, str):
            taxonomy = Taxonomy.from_file(taxonomy)
        self.taxonomy = taxonomy if taxonomy is not None else DEFAULT_TAXONOMY
        if default_category is not None:
            self.taxonomy.validate(default_category)
        self.model_dir = Path(model_dir).expanduser()
        config_path = self.model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"hf option 'model_dir': no config.json in {self.model_dir} "
                                    "(it must be a local save_pretrained directory)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.label_map = dict(label_map or {})
        self.default_category = default_category
        self.multi_label = config.get("problem_type") == "multi_label_classification"
        id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
        self.num_labels = len(id2label) or int(config.get("num_labels", 2))
        self.classes = (
            {0: UNSAFE} if self.num_labels == 1 and not self.label_map
            else map_labels(id2label, self.taxonomy, self.label_map))
        self.id2label = id2label
        kinds = set(self.classes.values())
        if self.num_labels > 1 and not self.multi_label and SAFE not in kinds:
            raise ValueError(f"hf model classes {list(id2label.values())} have no safe class; "
                             "its probability is what the score is built from (use 'label_map')")
        if kinds <= {SAFE}:
            raise ValueError(f"hf model classes {list(id2label.values())} are all safe")
        self._model: Any = None
        self._tokenizer: Any = None
        self._inputs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_tokenizer": None, "_inputs": None}

    def _load(self) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as exc:
            raise ImportError("the 'hf' classifier needs transformers: "
                              "pip install 'megatron-srp[hf]'") from exc
        if self.device == "auto":
            from megatron_srp import compat
            device = compat.device()
        else:
            device = torch.device(self.device)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, local_files_only=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        # only the inputs forward() names (a Llama model takes no token_type_ids)
        self._inputs = set(inspect.signature(model.forward).parameters)
        self._model, self._tokenizer = model.to(device).eval(), tokenizer

    def probabilities(self, texts: Sequence[str]):
        """``(n, num_labels)`` class probabilities (softmax, or sigmoid for one-logit and
        multi-label models), float64 numpy."""
        import numpy as np
        import torch

        if self._model is None:
            self._load()
        out = []
        device = next(self._model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                    truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in self._inputs}
            with torch.inference_mode():
                logits = self._model(**batch).logits.float()
            probs = (torch.sigmoid(logits) if self.num_labels == 1 or self.multi_label
                     else torch.softmax(logits, dim=-1))
            out.append(probs.cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_labels))

    def classify(self, texts: Sequence[str]) -> list[SafetyLabel]:
        if isinstance(texts, str):
            raise TypeError("classify takes a sequence of texts, not one string")
        probs = self.probabilities(list(texts))
        safe_ids = [i for i, v in self.classes.items() if v == SAFE]
        cat_ids = [i for i, v in self.classes.items() if v not in (SAFE, UNSAFE)]
        harm_ids = [i for i, v in self.classes.items() if v != SAFE]
        labels = []
        for row in probs:
            if self.multi_label or self.num_labels == 1:
                score = float(max(row[i] for i in harm_ids))
            else:
                score = float(1.0 - sum(row[i] for i in safe_ids))
            score = min(1.0, max(0.0, score))
            if score < self.threshold:
                labels.append(SafetyLabel(safe=True, category=None, score=score))
                continue
            category = (self.classes[max(cat_ids, key=lambda i: row[i])] if cat_ids
                        else self.default_category)
            labels.append(SafetyLabel(safe=False, category=category, score=score))
        return labels

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_dir": str(self.model_dir),
                "threshold": self.threshold, "batch_size": self.batch_size,
                "max_length": self.max_length, "device": self.device,
                "classes": {self.id2label.get(i, str(i)): v for i, v in self.classes.items()},
                "default_category": self.default_category, "taxonomy": self.taxonomy.name}
