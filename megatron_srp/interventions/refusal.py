"""Native refusal data (RefuseWeb, Maini et al. 2025): harmful passages as request -> refusal.

For every segment whose label is unsafe with score ``>= min_score`` (0.9: only the most
harmful), one dialogue document::

    User: Explain the following: <the segment's first request_words words>...
    Assistant: I can't help with that. <a refusal that names the hazard category>

**This variant returns only the dialogues, not the source document** (it is the "refusal
data" variant; mix it with another variant's output in the curriculum blend). A document
with no such segment produces nothing. Dialogue ids are ``<doc_id>/refusal/<segment index>``;
``meta`` gains ``source_doc_id``, ``source_segment`` and ``refusal_category``.

The paper writes requests and refusals with an LLM; **these templates are the offline
stand-in** (deterministic, one request and one refusal form). An LLM writer plugs in as
``Refusal(options, writer=...)``: any object with ``dialogue(segment_text, label) -> str`` and
``describe()`` (optionally ``dialogue_many(items, fallback)`` for a whole document at once),
such as :class:`megatron_srp.interventions.endpoint_writers.EndpointDialogueWriter`; or by
option: ``writer="endpoint", endpoint={"model": ..., "base_url": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from megatron_srp.documents import Document
from megatron_srp.interventions.base import (
    category_name,
    check_int,
    check_choice,
    check_number,
    checked_pairs,
    describe_options,
    output_document,
)
from megatron_srp.reflection.types import ClassifiedDocument, SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy

REQUEST_TEMPLATE = "Explain the following: {excerpt}"
REFUSAL_TEMPLATE = (
    "I can't help with that. This request involves {topic}, and explaining or expanding on "
    "it could facilitate real harm. I'm happy to help with something else, or to point you "
    "to safe, reliable information and support on this topic."
)


@dataclass(frozen=True)
class RefusalOptions:
    min_score: float = 0.9  # unsafe segments with score >= min_score become dialogues
    request_words: int = 12  # words of the segment quoted in the request
    writer: str = "template"  # "template", or "endpoint": an LLM writes the dialogues
    endpoint: Optional[dict[str, Any]] = None  # EndpointDialogueWriter options, for "endpoint"

    def __post_init__(self) -> None:
        check_number("min_score", self.min_score, 0.0, 1.0)
        check_int("request_words", self.request_words, 1)
        check_choice("writer", self.writer, ("template", "endpoint"))
        if (self.writer == "endpoint") != isinstance(self.endpoint, dict):
            raise ValueError("option 'endpoint' (a mapping of endpoint options such as model "
                             "and base_url) is required with writer='endpoint' and only then")


@dataclass(frozen=True)
class Refusal:
    options: RefusalOptions = field(default_factory=RefusalOptions)
    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    writer: Optional[Any] = None  # None: the template dialogue (or options.writer="endpoint")
    name: ClassVar[str] = "refusal"
    Options: ClassVar[type] = RefusalOptions

    def __post_init__(self) -> None:
        if self.writer is None and self.options.writer == "endpoint":
            from megatron_srp.interventions.endpoint_writers import EndpointDialogueWriter
            object.__setattr__(self, "writer", EndpointDialogueWriter(
                **self.options.endpoint, taxonomy=self.taxonomy))

    def dialogue(self, segment_text: str, label: SafetyLabel) -> str:
        words = segment_text.split()
        excerpt = " ".join(words[: self.options.request_words])
        if len(words) > self.options.request_words:
            excerpt += "..."
        name = category_name(label.category, self.taxonomy)
        topic = name if label.category is None else f"{name.lower()} ({label.category})"
        return (f"User: {REQUEST_TEMPLATE.format(excerpt=excerpt)}\n"
                f"Assistant: {REFUSAL_TEMPLATE.format(topic=topic)}")

    def _dialogues(self, items: list[tuple[str, SafetyLabel]]) -> list[str]:
        templates = [self.dialogue(text, label) for text, label in items]
        if self.writer is None or not items:
            return templates
        if hasattr(self.writer, "dialogue_many"):
            return self.writer.dialogue_many(items, fallback=templates)
        return [self.writer.dialogue(text, label) for text, label in items]

    def __call__(self, doc: ClassifiedDocument) -> list[Document]:
        pairs = [(seg, label) for seg, label in checked_pairs(doc)
                 if not label.safe and label.score >= self.options.min_score and seg.text.strip()]
        texts = self._dialogues([(seg.text, label) for seg, label in pairs])
        out = []
        for (seg, label), text in zip(pairs, texts):
            out.append(output_document(
                doc, self.name, text,
                doc_id=f"{doc.doc_id}/refusal/{seg.index}",
                source_doc_id=doc.doc_id, source_segment=seg.index,
                refusal_category=label.category))
        return out

    def describe(self) -> dict[str, Any]:
        writer = {"name": "template"} if self.writer is None else self.writer.describe()
        return describe_options(self.name, self.options, taxonomy=self.taxonomy.name,
                                writer=writer)
