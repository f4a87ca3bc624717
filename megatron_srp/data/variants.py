"""Output variants: ``name[=intervention][:key=value,...]`` -> :class:`Variant` objects.

``srp`` is the name for the ``reflect`` intervention (Safety Reflection Pretraining); every
other variant name that is an intervention's name needs no ``=``. Examples::

    raw            the identity (the baseline dataset)
    srp            reflect with its defaults
    tag:p=0.1      the tag intervention with p = 0.1, written as variant "tag"
    srp-end=reflect:every_segment=false,include_category=false
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from megatron_srp.data.shard_worker import Variant
from megatron_srp.interventions import INTERVENTIONS, build_intervention

ALIASES = {"srp": "reflect"}


@dataclass(frozen=True)
class VariantSpec:
    """A variant as configured: its output name, intervention name and options."""

    name: str
    intervention: str = ""  # "": the intervention named like the variant (or its alias)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def intervention_name(self) -> str:
        return self.intervention or ALIASES.get(self.name, self.name)

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        """Parse ``name[=intervention][:key=value,...]``; errors quote the text."""
        head, _, opts = text.strip().partition(":")
        name, _, intervention = head.partition("=")
        name, intervention = name.strip(), intervention.strip()
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"variant {text!r}: the name must be letters, digits, '-' or '_'")
        options: dict[str, Any] = {}
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"variant {text!r}: option {item!r} is not key=value")
            options[key.strip()] = yaml.safe_load(value)
        spec = cls(name, intervention, options)
        if spec.intervention_name not in INTERVENTIONS:
            raise ValueError(f"variant {text!r}: unknown intervention "
                             f"{spec.intervention_name!r}; expected one of "
                             f"{', '.join(INTERVENTIONS)} (or 'srp' for reflect)")
        return spec


def parse_variants(text: str) -> list[VariantSpec]:
    """A comma-separated list of plain variant names (``raw,filter,tag,srp``)."""
    return [VariantSpec.parse(item) for item in text.split(",") if item.strip()]


def build_variants(specs: Sequence[VariantSpec]) -> tuple[Variant, ...]:
    """Build every variant's intervention; a bad option names the variant and the option."""
    variants = []
    for spec in specs:
        try:
            intervention = build_intervention(spec.intervention_name, **spec.options)
        except ValueError as exc:
            raise ValueError(f"variant {spec.name!r}: {exc}") from None
        variants.append(Variant(spec.name, intervention))
    return tuple(variants)
