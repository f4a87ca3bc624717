"""Safety interventions: pure, deterministic ``ClassifiedDocument -> list[Document]`` transforms.

Each variant of the training data is one intervention applied to classified documents:

========== ============================================================ =====================
name       what it does                                                 options
========== ============================================================ =====================
raw        identity, the baseline                                       (none)
reflect    SRP: a reflection after every segment (or one at the end)    every_segment, include_category
filter     drop harmful segments, or whole documents                    mode, threshold
tag        ``<potentially_unsafe_content>`` before words of unsafe text p, seed
rewrite    unsafe segments replaced by a safe rewrite (template or endpoint) rewriter, threshold, endpoint
refusal    request -> refusal dialogues from the most harmful segments  min_score, request_words, writer, endpoint
========== ============================================================ =====================

Every intervention is a frozen dataclass holding a frozen options dataclass; it has a class
attribute ``name`` and ``describe()`` (name + options, for dataset metadata). Randomness is
drawn from ``(seed, document id)``, so results never depend on worker count or order.
Build one by name with :func:`build_intervention`; see ``docs/interventions.md``.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_srp.interventions.base import Intervention, make_options
from megatron_srp.interventions.filter import Filter, FilterOptions
from megatron_srp.interventions.raw import Raw, RawOptions
from megatron_srp.interventions.reflect import Reflect, ReflectOptions
from megatron_srp.interventions.refusal import Refusal, RefusalOptions
from megatron_srp.interventions.rewrite import (
    Rewrite,
    RewriteOptions,
    Rewriter,
    TemplateRewriter,
)
from megatron_srp.interventions.tag import Tag, TagOptions
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy

INTERVENTIONS: dict[str, type] = {
    cls.name: cls for cls in (Raw, Reflect, Filter, Tag, Rewrite, Refusal)
}
_USES_TAXONOMY = {"reflect", "rewrite", "refusal"}


def build_intervention(name: str, *, taxonomy: Optional[Taxonomy] = None,
                       **options: Any) -> Intervention:
    """The intervention called ``name`` with ``options``.

    Raises ValueError for an unknown name (listing the known ones), an unknown option, or a
    bad option value (naming the option). ``taxonomy`` (default: Llama Guard 3 S1-S14) is
    used by the interventions that write category codes or names.
    """
    cls = INTERVENTIONS.get(name)
    if cls is None:
        raise ValueError(f"unknown intervention {name!r}; expected one of "
                         f"{', '.join(INTERVENTIONS)}")
    opts = make_options(cls.Options, name, options)
    if name in _USES_TAXONOMY:
        return cls(opts, taxonomy=taxonomy if taxonomy is not None else DEFAULT_TAXONOMY)
    return cls(opts)


__all__ = [
    "INTERVENTIONS", "Intervention", "build_intervention",
    "Raw", "RawOptions", "Reflect", "ReflectOptions", "Filter", "FilterOptions",
    "Tag", "TagOptions", "Rewrite", "RewriteOptions", "Rewriter", "TemplateRewriter",
    "Refusal", "RefusalOptions",
]
