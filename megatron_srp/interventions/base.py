"""What every intervention shares: the protocol, option checks, seeded randomness, doc checks."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, fields
from typing import Any, ClassVar, Iterable, Protocol, runtime_checkable

from megatron_srp.documents import Document
from megatron_srp.reflection.types import ClassifiedDocument, SafetyLabel, Segment
from megatron_srp.taxonomy import Taxonomy


@runtime_checkable
class Intervention(Protocol):
    """A pure, deterministic ``ClassifiedDocument -> list[Document]`` transform (picklable)."""

    name: ClassVar[str]

    def __call__(self, doc: ClassifiedDocument) -> list[Document]: ...

    def describe(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- option checks
def check_bool(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"option {option!r} must be True or False, got {value!r}")


def check_number(option: str, value: Any, low: float, high: float,
                 low_open: bool = False) -> None:
    """``value`` must be a real number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"option {option!r} must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"option {option!r} must be in {interval}, got {value!r}")


def check_int(option: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"option {option!r} must be an integer >= {low}, got {value!r}")


def check_choice(option: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"option {option!r} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


def make_options(options_cls: type, intervention: str, options: dict[str, Any]) -> Any:
    """``options_cls(**options)``; an unknown key is a ValueError listing the known ones."""
    known = [f.name for f in fields(options_cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for intervention "
                         f"{intervention!r}; expected {', '.join(known) if known else 'none'}")
    return options_cls(**options)


def describe_options(name: str, options: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, **asdict(options), **extra}


# ---------------------------------------------------------------- randomness
def doc_rng(seed: int, doc_id: str, salt: str) -> random.Random:
    """A generator that depends only on (seed, document id, salt): never on order or workers."""
    digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{doc_id}".encode("utf-8"),
                             digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "big"))


# ---------------------------------------------------------------- documents
def checked_pairs(doc: ClassifiedDocument) -> list[tuple[Segment, SafetyLabel]]:
    """The (segment, label) pairs of ``doc`` after checking the segments against its text:
    each ``segment.text == doc.text[start:end]``, in order and not overlapping."""
    previous_end = 0
    for seg in doc.segments:
        if not (previous_end <= seg.start <= seg.end <= len(doc.text)):
            raise ValueError(f"document {doc.doc_id!r}: segment {seg.index} spans "
                             f"[{seg.start}, {seg.end}), out of order, overlapping or beyond "
                             f"the text ({len(doc.text)} characters)")
        if doc.text[seg.start:seg.end] != seg.text:
            raise ValueError(f"document {doc.doc_id!r}: segment {seg.index} text does not match "
                             f"doc.text[{seg.start}:{seg.end}]")
        previous_end = seg.end
    return list(zip(doc.segments, doc.labels))


def output_document(doc: ClassifiedDocument, name: str, text: str, doc_id: str | None = None,
                    **meta: Any) -> Document:
    """An output document: the input's meta plus ``intervention`` and ``meta``."""
    return Document(doc_id=doc.doc_id if doc_id is None else doc_id, text=text,
                    meta={**doc.meta, "intervention": name, **meta})


def category_name(category: str | None, taxonomy: Taxonomy) -> str:
    """The human-readable name of a category code; a generic phrase when there is none."""
    if category is None:
        return "potentially harmful content"
    return taxonomy[category].name


def split_outer_whitespace(text: str) -> tuple[str, str, str]:
    """``(leading whitespace, core, trailing whitespace)`` with ``"".join(...) == text``."""
    core = text.strip()
    if not core:
        return text, "", ""
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()):]
    return lead, core, trail
