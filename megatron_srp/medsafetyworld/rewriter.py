"""The world-aware contextual rewriter of the ``rewrite`` variant (SafeWeb's rewriting).

SafeWeb rewrites an unsafe passage with an LLM that keeps its knowledge and frames it: why
acting on it is harmful, what to do instead. In the world the rewrite is written from the
world's own facts when the corpus is built (``rewrite`` field of each unsafe passage, from the
template file), so it is exact and needs no model. This class hands those rewrites to the
project's ``Rewrite`` intervention through its ``Rewriter`` protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_srp.reflection.types import SafetyLabel
from megatron_srp.units import stamp


@dataclass(frozen=True)
class WorldRewriter:
    rewrites: tuple[tuple[str, str], ...]  # (unsafe passage text, its rewrite)

    @classmethod
    def from_corpus(cls, corpus: list[dict]) -> "WorldRewriter":
        return cls(tuple((item["text"], item["rewrite"]) for item in corpus
                         if item["label"] == "unsafe" and "rewrite" in item))

    def rewrite(self, segment_text: str, label: SafetyLabel) -> str:
        for text, rewritten in self.rewrites:
            if text == segment_text:
                return rewritten
        raise ValueError(f"no world rewrite for the passage {segment_text[:80]!r} (labelled "
                         f"{label.category}); is it a passage of this world's corpus?")

    def describe(self) -> dict[str, Any]:
        return {"rewriter": "medsafetyworld", "passages": len(self.rewrites),
                "stamp": stamp(self.rewrites)}
