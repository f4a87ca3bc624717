"""Hazard categories and the reflection vocabulary.

The exact strings here are a contract shared by preprocessing, training and evaluation: the
tokenizer reserves the special tokens below, interventions write reflections with
:func:`format_reflection`, and evaluation reads model output back with :func:`parse_reflection`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

REFLECT_OPEN = "<|reflect|>"
REFLECT_CLOSE = "<|/reflect|>"
UNSAFE_TAG = "<potentially_unsafe_content>"
EOD = "<|endoftext|>"
PAD = "<|pad|>"

#: Tokens the tokenizer must own as atomic special tokens, in the order they are added.
SPECIAL_TOKENS: tuple[str, ...] = (EOD, PAD, REFLECT_OPEN, REFLECT_CLOSE, UNSAFE_TAG)

SAFE_LABEL = "Safe"
UNSAFE_LABEL = "Unsafe"

# A code must survive the "Unsafe: <code>" round trip, so no whitespace, colons or markup.
_CODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_REFLECTION_RE = re.compile(
    re.escape(REFLECT_OPEN)
    + rf"(?:(?P<safe>{SAFE_LABEL})|{UNSAFE_LABEL}(?:: (?P<code>[^\s<]+))?)"
    + re.escape(REFLECT_CLOSE)
)


@dataclass(frozen=True)
class HazardCategory:
    """One hazard category: a short code used in reflections and a human-readable name."""

    code: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _CODE_RE.fullmatch(self.code):
            raise ValueError(
                f"hazard category code {self.code!r} must match {_CODE_RE.pattern} "
                "(it is written into reflections as 'Unsafe: <code>')"
            )
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"hazard category {self.code!r} needs a non-empty name")


LLAMA_GUARD_3_CATEGORIES: tuple[HazardCategory, ...] = tuple(
    HazardCategory(f"S{i}", name)
    for i, name in enumerate(
        [
            "Violent Crimes",
            "Non-Violent Crimes",
            "Sex-Related Crimes",
            "Child Sexual Exploitation",
            "Defamation",
            "Specialized Advice",
            "Privacy",
            "Intellectual Property",
            "Indiscriminate Weapons",
            "Hate",
            "Suicide & Self-Harm",
            "Sexual Content",
            "Elections",
            "Code Interpreter Abuse",
        ],
        start=1,
    )
)


class Taxonomy:
    """An ordered, duplicate-free set of hazard categories.

    The default is Llama Guard 3's S1-S14 (MLCommons); projects with other categories load
    their own from a JSON or YAML file of the form
    ``{"name": ..., "categories": [{"code": "S1", "name": "Violent Crimes"}, ...]}``.
    """

    def __init__(self, categories: Sequence[HazardCategory], name: str = "custom") -> None:
        if not categories:
            raise ValueError(f"taxonomy {name!r} has no categories")
        self.name = name
        self._by_code: dict[str, HazardCategory] = {}
        for category in categories:
            if category.code in self._by_code:
                raise ValueError(f"taxonomy {name!r} lists category code {category.code!r} twice")
            self._by_code[category.code] = category

    @classmethod
    def default(cls) -> Taxonomy:
        """Llama Guard 3 / MLCommons S1-S14, as used by Maini et al. 2025."""
        return cls(LLAMA_GUARD_3_CATEGORIES, name="llama-guard-3")

    @classmethod
    def from_file(cls, path: str | Path) -> Taxonomy:
        """Load a taxonomy from ``.json``, ``.yaml`` or ``.yml``; errors name the file and key."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                raise ValueError(f"{path}: taxonomy file must end in .json, .yaml or .yml")
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot parse taxonomy file: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Taxonomy:
        """Build a taxonomy from parsed file content; ``source`` names the origin in errors."""
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise ValueError(f"{source}: expected a mapping with a 'categories' list")
        categories = []
        for i, entry in enumerate(data["categories"]):
            if not isinstance(entry, dict) or set(entry) != {"code", "name"}:
                raise ValueError(
                    f"{source}: categories[{i}] must be a mapping with exactly the keys "
                    f"'code' and 'name', got {entry!r}"
                )
            try:
                categories.append(HazardCategory(entry["code"], entry["name"]))
            except ValueError as exc:
                raise ValueError(f"{source}: categories[{i}]: {exc}") from exc
        try:
            return cls(categories, name=str(data.get("name", Path(source).stem)))
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The file form accepted by :meth:`from_dict`, for recording in dataset metadata."""
        return {"name": self.name, "categories": [{"code": c.code, "name": c.name} for c in self]}

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(self._by_code)

    def validate(self, code: str) -> str:
        """``code`` if it belongs to this taxonomy; else a ValueError that lists the valid codes."""
        if code not in self._by_code:
            raise ValueError(
                f"unknown hazard category {code!r} for taxonomy {self.name!r}; "
                f"expected one of {', '.join(self.codes)}"
            )
        return code

    def __getitem__(self, code: str) -> HazardCategory:
        return self._by_code[self.validate(code)]

    def __contains__(self, code: object) -> bool:
        return code in self._by_code

    def __iter__(self) -> Iterator[HazardCategory]:
        return iter(self._by_code.values())

    def __len__(self) -> int:
        return len(self._by_code)

    def __repr__(self) -> str:
        return f"Taxonomy(name={self.name!r}, codes={list(self.codes)})"


DEFAULT_TAXONOMY = Taxonomy.default()


def format_reflection(
    safe: bool,
    category: str | None = None,
    include_category: bool = True,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
) -> str:
    """The reflection text the model learns to emit after a segment.

    ``<|reflect|>Safe<|/reflect|>``, ``<|reflect|>Unsafe: S2<|/reflect|>``, or with
    ``include_category=False`` for an unsafe segment, ``<|reflect|>Unsafe<|/reflect|>``.
    """
    if safe:
        if category is not None:
            raise ValueError(f"a safe reflection takes no category, got {category!r}")
        label = SAFE_LABEL
    elif not include_category:
        label = UNSAFE_LABEL
    elif category is None:
        raise ValueError(
            "an unsafe reflection needs a category; pass include_category=False for a bare 'Unsafe'"
        )
    else:
        label = f"{UNSAFE_LABEL}: {taxonomy.validate(category)}"
    return f"{REFLECT_OPEN}{label}{REFLECT_CLOSE}"


def parse_reflection(text: str, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> tuple[bool, str | None]:
    """Inverse of :func:`format_reflection`: ``(safe, category)``.

    The whole text must be exactly one reflection; callers strip surrounding text first.
    """
    match = _REFLECTION_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"malformed reflection {text!r}: expected {REFLECT_OPEN}{SAFE_LABEL}{REFLECT_CLOSE}, "
            f"{REFLECT_OPEN}{UNSAFE_LABEL}{REFLECT_CLOSE} or "
            f"{REFLECT_OPEN}{UNSAFE_LABEL}: <code>{REFLECT_CLOSE}"
        )
    if match.group("safe"):
        return True, None
    code = match.group("code")
    return False, None if code is None else taxonomy.validate(code)
