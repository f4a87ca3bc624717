"""The long phrasing set (examples/medsafetyworld/templates_long.yaml): written apart from the
other two, the request before the chart, passages of 100 to about 140 tokens."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megatron_srp.medsafetyworld import corpus as C
from megatron_srp.medsafetyworld.templates import DEFAULT_TEMPLATES, KINDS, load_templates
from megatron_srp.medsafetyworld.world import generate_world

REPO = Path(__file__).resolve().parent.parent
ALT_TEMPLATES = REPO / "examples" / "medsafetyworld" / "templates_alt.yaml"
LONG_TEMPLATES = REPO / "examples" / "medsafetyworld" / "templates_long.yaml"
NEEDS_LONG = pytest.mark.skipif(not LONG_TEMPLATES.is_file(), reason="no templates_long.yaml")


def _leaves(raw) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    items = raw.values() if isinstance(raw, dict) else raw
    return [s for item in items for s in _leaves(item)]


def _sentences(path: Path) -> set[str]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {s.strip() for text in _leaves(raw)
            for s in re.split(r"(?<=[.?!;:])\s+", text) if s.strip()}


@NEEDS_LONG
def test_the_long_phrasing_set_is_new_and_asks_first() -> None:
    """Written apart: no sentence of templates_long.yaml is one of the other two files'; its
    request (the intent) comes before the chart; its markers are its own."""
    long_ = _sentences(LONG_TEMPLATES)
    for other in (DEFAULT_TEMPLATES, ALT_TEMPLATES):
        shared = long_ & _sentences(other)
        # a marker or a placeholder alone is no sentence
        assert not {s for s in shared if re.sub(r"\{\w+\}|\w+:", "", s).strip()}, \
            (other, shared)
    t = load_templates(LONG_TEMPLATES)
    assert t.passage.index("{intent}") < t.passage.index("{chart}")
    others = set(load_templates().markers()) | set(load_templates(ALT_TEMPLATES).markers())
    assert not set(t.markers()) & others


@NEEDS_LONG
def test_the_long_phrasing_sets_passages_are_long() -> None:
    """Its question-and-answer passages: 100 to about 140 tokens of the project tokenizer,
    every kind (docs/medsafetyworld.md has the table for a 1000-patient world)."""
    from megatron_srp.tokenizer import SRPTokenizer, default_tokenizer_dir

    tok = SRPTokenizer.from_dir(default_tokenizer_dir())
    world = generate_world(0, n_conditions=10, n_patients=100)
    corpus = C.build_corpus(world, load_templates(LONG_TEMPLATES), C.CorpusConfig())
    for kind in KINDS:
        lengths = [len(tok.tokenize(i["text"])) for i in corpus if i["kind"] == kind]
        assert lengths and 100 <= min(lengths) and max(lengths) <= 140, (kind, lengths)
