"""Hazard taxonomy and the reflection text contract."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_srp.taxonomy import (
    DEFAULT_TAXONOMY,
    EOD,
    PAD,
    REFLECT_CLOSE,
    REFLECT_OPEN,
    SPECIAL_TOKENS,
    UNSAFE_TAG,
    HazardCategory,
    Taxonomy,
    format_reflection,
    parse_reflection,
)

EXPECTED_NAMES = [
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
]


def test_default_taxonomy_is_llama_guard_3() -> None:
    assert DEFAULT_TAXONOMY.codes == tuple(f"S{i}" for i in range(1, 15))
    assert [c.name for c in DEFAULT_TAXONOMY] == EXPECTED_NAMES
    assert DEFAULT_TAXONOMY["S11"] == HazardCategory("S11", "Suicide & Self-Harm")
    assert "S14" in DEFAULT_TAXONOMY and "S15" not in DEFAULT_TAXONOMY
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TAXONOMY["S1"].name = "x"  # type: ignore[misc]


def test_special_tokens_are_the_reserved_strings() -> None:
    assert SPECIAL_TOKENS == (EOD, PAD, REFLECT_OPEN, REFLECT_CLOSE, UNSAFE_TAG)
    assert (REFLECT_OPEN, REFLECT_CLOSE, UNSAFE_TAG) == (
        "<|reflect|>",
        "<|/reflect|>",
        "<potentially_unsafe_content>",
    )
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)


def test_format_exact_strings() -> None:
    assert format_reflection(True, None) == "<|reflect|>Safe<|/reflect|>"
    assert format_reflection(False, "S2") == "<|reflect|>Unsafe: S2<|/reflect|>"
    assert format_reflection(False, "S2", include_category=False) == "<|reflect|>Unsafe<|/reflect|>"
    assert format_reflection(False, None, include_category=False) == "<|reflect|>Unsafe<|/reflect|>"


@pytest.mark.parametrize("code", [None, *DEFAULT_TAXONOMY.codes])
def test_round_trip(code: str | None) -> None:
    safe = code is None
    assert parse_reflection(format_reflection(safe, code)) == (safe, code)


def test_bare_unsafe_round_trip() -> None:
    assert parse_reflection(format_reflection(False, None, include_category=False)) == (False, None)


def test_format_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError, match="safe reflection takes no category"):
        format_reflection(True, "S1")
    with pytest.raises(ValueError, match="needs a category"):
        format_reflection(False, None)
    with pytest.raises(ValueError, match="unknown hazard category 'S15'.*S1, S2"):
        format_reflection(False, "S15")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Safe",
        "<|reflect|>safe<|/reflect|>",
        "<|reflect|>Safe",
        "Safe<|/reflect|>",
        " <|reflect|>Safe<|/reflect|>",
        "<|reflect|>Safe<|/reflect|>\n",
        "<|reflect|>Unsafe:S2<|/reflect|>",
        "<|reflect|>Unsafe: S2 <|/reflect|>",
        "<|reflect|>Unsafe: <|/reflect|>",
        "<|reflect|>Unsafe - S2<|/reflect|>",
        "<|reflect|>Safe<|/reflect|><|reflect|>Safe<|/reflect|>",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="malformed reflection"):
        parse_reflection(text)


def test_parse_rejects_unknown_category() -> None:
    with pytest.raises(ValueError, match="unknown hazard category 'S99'"):
        parse_reflection("<|reflect|>Unsafe: S99<|/reflect|>")


def test_custom_taxonomy_from_yaml_and_json(tmp_path) -> None:
    yaml_file = tmp_path / "med.yaml"
    yaml_file.write_text(
        "name: medsafety\ncategories:\n"
        "  - {code: M1, name: Dosage Harm}\n"
        "  - {code: M2, name: Self-Medication}\n"
    )
    tax = Taxonomy.from_file(yaml_file)
    assert tax.name == "medsafety" and tax.codes == ("M1", "M2")
    text = format_reflection(False, "M2", taxonomy=tax)
    assert text == "<|reflect|>Unsafe: M2<|/reflect|>"
    assert parse_reflection(text, taxonomy=tax) == (False, "M2")
    with pytest.raises(ValueError, match="unknown hazard category 'S1'"):
        format_reflection(False, "S1", taxonomy=tax)

    json_file = tmp_path / "copy.json"
    json_file.write_text(json.dumps(tax.to_dict()))
    assert Taxonomy.from_file(json_file).to_dict() == tax.to_dict()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"categories": [{"code": "S1", "name": "a"}, {"code": "S1", "name": "b"}]}', "twice"),
        ('{"categories": [{"code": "S 1", "name": "a"}]}', r"categories\[0\].*must match"),
        ('{"categories": [{"code": "S1"}]}', r"categories\[0\] must be a mapping"),
        ('{"categories": []}', "no categories"),
        ('{"cats": []}', "'categories' list"),
        ("{not json", "cannot parse"),
    ],
)
def test_bad_taxonomy_file_names_file_and_key(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        Taxonomy.from_file(path)
    assert str(path) in str(info.value)


def test_taxonomy_file_suffix_checked(tmp_path) -> None:
    path = tmp_path / "tax.toml"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"tax\.toml.*\.json, \.yaml or \.yml"):
        Taxonomy.from_file(path)
