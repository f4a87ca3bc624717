"""Contextual rewriting (SafeWeb, Maini et al. 2025): unsafe passages reframed, not deleted.

Each segment whose label is unsafe with score ``>= threshold`` is replaced by
``rewriter.rewrite(segment_text, label)``; safe segments and the text between segments are
unchanged, and so is the segment's surrounding whitespace (only its core text is passed).

The paper rewrites with an LLM that keeps the knowledge but frames it as harmful and
redirects. **The default :class:`TemplateRewriter` is an offline stand-in for that LLM**: it
replaces the passage with a fixed, deterministic notice that names the hazard category,
says the passage was withheld because it could facilitate that harm, and points to safe
help. It keeps none of the passage's content. The LLM rewriter (an OpenAI-compatible
endpoint, :class:`megatron_srp.interventions.endpoint_writers.EndpointRewriter`) slots in
through the :class:`Rewriter` protocol: ``Rewrite(options, rewriter=MyRewriter())``, or by
option: ``rewriter="endpoint", endpoint={"model": ..., "base_url": ...}``. A rewriter with a
``rewrite_many(items)`` method gets all of a document's passages in one call (concurrent
requests). ``meta["rewritten_segments"]`` lists the indices of the replaced segments;
``meta["segment_spans"]`` gives each unchanged segment's ``[start, end)`` in the output text
(None for a rewritten one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

from megatron_srp.documents import Document
from megatron_srp.interventions.base import (
    category_name,
    check_choice,
    check_number,
    checked_pairs,
    describe_options,
    output_document,
    split_outer_whitespace,
)
from megatron_srp.reflection.types import ClassifiedDocument, SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy


@runtime_checkable
class Rewriter(Protocol):
    """Turns one unsafe passage into its safe rewrite. Must be deterministic and picklable."""

    def rewrite(self, segment_text: str, label: SafetyLabel) -> str: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TemplateRewriter:
    """Offline stand-in for the LLM rewriter: a fixed notice naming the hazard category."""

    taxonomy: Taxonomy = DEFAULT_TAXONOMY

    TEMPLATE: ClassVar[str] = (
        "[A passage about {topic} was withheld here because it could help someone "
        "facilitate {harm}. Content like this can cause real harm to people. If this topic "
        "affects you or someone you know, look for safe, reliable help and support instead.]"
    )

    def rewrite(self, segment_text: str, label: SafetyLabel) -> str:
        name = category_name(label.category, self.taxonomy)
        topic = name if label.category is None else f"{name} ({label.category})"
        harm = name if label.category is None else name.lower()
        return self.TEMPLATE.format(topic=topic, harm=harm)

    def describe(self) -> dict[str, Any]:
        return {"name": "template", "taxonomy": self.taxonomy.name}


REWRITERS = ("template", "endpoint")


@dataclass(frozen=True)
class RewriteOptions:
    rewriter: str = "template"  # which built-in rewriter, unless one is passed in
    threshold: float = 0.0  # unsafe segments with score >= threshold are rewritten
    endpoint: Optional[dict[str, Any]] = None  # EndpointRewriter options, for "endpoint"

    def __post_init__(self) -> None:
        check_choice("rewriter", self.rewriter, REWRITERS)
        check_number("threshold", self.threshold, 0.0, 1.0)
        if (self.rewriter == "endpoint") != isinstance(self.endpoint, dict):
            raise ValueError("option 'endpoint' (a mapping of endpoint options such as model "
                             "and base_url) is required with rewriter='endpoint' and only then")


@dataclass(frozen=True)
class Rewrite:
    options: RewriteOptions = field(default_factory=RewriteOptions)
    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    rewriter: Optional[Rewriter] = None  # None: the built-in one named by options.rewriter
    name: ClassVar[str] = "rewrite"
    Options: ClassVar[type] = RewriteOptions

    def __post_init__(self) -> None:
        if self.rewriter is None and self.options.rewriter == "endpoint":
            from megatron_srp.interventions.endpoint_writers import EndpointRewriter
            object.__setattr__(self, "rewriter",
                               EndpointRewriter(**self.options.endpoint, taxonomy=self.taxonomy,
                                                fallback=TemplateRewriter(self.taxonomy)))

    def _rewriter(self) -> Rewriter:
        return self.rewriter if self.rewriter is not None else TemplateRewriter(self.taxonomy)

    def __call__(self, doc: ClassifiedDocument) -> list[Document]:
        rewriter = self._rewriter()
        todo = []
        for seg, label in checked_pairs(doc):
            if label.safe or label.score < self.options.threshold:
                continue
            lead, core, trail = split_outer_whitespace(seg.text)
            if core:
                todo.append((seg, label, lead, core, trail))
        items = [(core, label) for _, label, _, core, _ in todo]
        many = getattr(rewriter, "rewrite_many", None)
        texts = many(items) if many is not None and items else [rewriter.rewrite(*i) for i in items]
        pieces, cursor, rewritten, growth = [], 0, [], {}
        for (seg, _, lead, _, trail), text in zip(todo, texts):
            pieces.append(doc.text[cursor:seg.start])
            pieces.append(lead + text + trail)
            cursor = seg.end
            rewritten.append(seg.index)
            growth[seg.index] = len(lead + text + trail) - (seg.end - seg.start)
        pieces.append(doc.text[cursor:])
        spans, shift = [], 0  # unchanged segments move by the growth of rewrites before them
        for seg in doc.segments:
            spans.append(None if seg.index in growth else [seg.start + shift, seg.end + shift])
            shift += growth.get(seg.index, 0)
        return [output_document(doc, self.name, "".join(pieces), rewritten_segments=rewritten,
                                segment_spans=spans)]

    def describe(self) -> dict[str, Any]:
        return describe_options(self.name, self.options, rewriter=self._rewriter().describe())
