"""Documents and the stage protocol.

Preprocessing is ``reader -> stages -> segment + classify -> interventions -> tokenize``.
Stages (each ``Document -> 0..n Documents``) clean or split raw documents before they are
labelled. This module deliberately imports nothing from ``megatron.core``: it is what each
spawned worker process loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from megatron_srp.taxonomy import SPECIAL_TOKENS
from megatron_srp.tokenizer import SRPTokenizer


@dataclass
class Document:
    """One unit of text moving through the pipeline; ``meta`` carries source and labels."""

    doc_id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Stage(Protocol):
    """A pure document transform. Must be picklable: it is shipped to every worker process."""

    name: str

    def __call__(self, doc: Document) -> Iterable[Document]:
        """Zero documents drops ``doc``; several split it."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable settings, recorded in ``meta.json`` and in the config hash."""
        ...


class StageError(RuntimeError):
    """A stage failed on a document; the message names both (it must survive pickling)."""


@dataclass(frozen=True)
class StripSpecialTokens:
    """Delete special-token strings that occur literally in raw text.

    The tokenizer maps such strings to their reserved ids, so a web page containing
    ``<|reflect|>Safe<|/reflect|>`` would otherwise plant a reflection (or an early
    ``<|endoftext|>``) in training data. Stripping repeats until none is left, because deleting
    one token can join its neighbours into another (``<|ref<|pad|>lect|>``).
    """

    name: ClassVar[str] = "strip_special_tokens"
    tokens: tuple[str, ...] = SPECIAL_TOKENS

    def __call__(self, doc: Document) -> Iterator[Document]:
        text = doc.text
        removed = 0
        while any(t in text for t in self.tokens):
            for token in self.tokens:
                removed += text.count(token)
                text = text.replace(token, "")
        if removed:
            doc = replace(doc, text=text, meta={**doc.meta, "special_tokens_stripped": removed})
        yield doc

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tokens": list(self.tokens)}


def default_stages(tokenizer: SRPTokenizer) -> list[Stage]:
    """Stages every corpus gets: strip all of the tokenizer's special strings from raw text."""
    return [StripSpecialTokens(tokens=tokenizer.special_tokens)]


def describe_stages(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    """The ``stages`` entry of ``meta.json``; rejects objects that are not stages."""
    descriptions = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            raise TypeError(f"stages[{i}] ({stage!r}) lacks name / __call__ / describe()")
        description = stage.describe()
        if description.get("name") != stage.name:
            raise ValueError(f"stages[{i}].describe() must include 'name': {stage.name!r}")
        descriptions.append(description)
    return descriptions


def apply_stages(doc: Document, stages: Sequence[Stage]) -> list[Document]:
    """Run ``doc`` through every stage in order, collecting what comes out of the last one."""
    docs = [doc]
    for stage in stages:
        out: list[Document] = []
        for d in docs:
            try:
                produced = list(stage(d))
            except Exception as exc:
                raise StageError(
                    f"stage {stage.name!r} failed on document {d.doc_id}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            for p in produced:
                if not isinstance(p, Document):
                    raise StageError(
                        f"stage {stage.name!r} returned {type(p).__name__} for document "
                        f"{d.doc_id}; stages must yield Document objects"
                    )
            out.extend(produced)
        docs = out
    return docs
