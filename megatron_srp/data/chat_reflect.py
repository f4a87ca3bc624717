"""Reflections in chat finetuning data: post-training that keeps the model reflecting.

An SRP model learned in pretraining to follow its text with a reflection. Instruction tuning on
plain chat data trains answers that end without one, which can wash the habit out. Here a
safety classifier labels every assistant response once and its reflection is appended right
after it, in the SRP format (``<|reflect|>Safe<|/reflect|>`` / ``<|reflect|>Unsafe: S2<|/reflect|>``,
inserted at the end of the text, nothing else changed). The finetuning loss covers the whole
answer, so ``finetune_srp.py`` trains the model to close each answer with its verdict, which is
what reflection-guarded decoding reads.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_srp.taxonomy import (DEFAULT_TAXONOMY, REFLECT_CLOSE, REFLECT_OPEN, Taxonomy,
                                   format_reflection)


@dataclass
class ChatReflection:
    """Append a classifier's reflection to each assistant response of chat records
    (``{"prompt", "response"}`` or ``{"messages"}``). ``counts`` tallies the labels written
    (``Safe``, ``Unsafe: S2``, ...); each record gets ``reflections``: one
    ``{"safe", "category"}`` per response, in order."""

    classifier: Any  # a SafetyClassifier: classify(texts) -> list[SafetyLabel]
    include_category: bool = True
    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    counts: Counter = field(default_factory=Counter)

    def _where(self, records: list[dict]) -> list[tuple[int, int | None, str]]:
        found = []
        for i, record in enumerate(records):
            if "messages" in record:
                found += [(i, j, m["content"]) for j, m in enumerate(record["messages"])
                          if m.get("role") == "assistant"]
            else:
                found.append((i, None, record["response"]))
        for i, _, text in found:
            if REFLECT_OPEN in text or REFLECT_CLOSE in text:
                raise ValueError(f"record {i} ({records[i].get('source', '?')}): a response "
                                 f"already holds a reflection marker; it was reflected before")
        return found

    def __call__(self, records: list[dict]) -> list[dict]:
        where = self._where(records)
        labels = self.classifier.classify([text for _, _, text in where])
        if len(labels) != len(where):
            raise ValueError(f"classifier {self.classifier.name!r} returned {len(labels)} "
                             f"labels for {len(where)} responses")
        out = copy.deepcopy(records)
        for record in out:
            record["reflections"] = []
        for (i, j, text), label in zip(where, labels):
            category = None if label.safe or not self.include_category else label.category
            try:
                reflection = format_reflection(label.safe, category, self.include_category,
                                               taxonomy=self.taxonomy)
            except ValueError as exc:
                raise ValueError(f"record {i} ({records[i].get('source', '?')}): cannot write "
                                 f"a reflection for {label}: {exc}") from exc
            if j is None:
                out[i]["response"] = text + reflection
            else:
                out[i]["messages"][j]["content"] = text + reflection
            out[i]["reflections"].append({"safe": label.safe, "category": category})
            self.counts[reflection[len(REFLECT_OPEN):-len(REFLECT_CLOSE)]] += 1
        return out

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.classifier, "describe", None)
        return {"classifier": describe() if describe else self.classifier.name,
                "include_category": self.include_category, "counts": dict(self.counts)}
