"""The phrasing set of a world: every sentence of the corpus, the queries and the attacks.

A template file (YAML) is read once and checked before any work starts, so an experiment can
run on a phrasing set nobody tuned on (``templates=FILE``) and a typo is a named error, not a
KeyError deep in the generator. The shipped default is ``assets/medsafetyworld/templates.yaml``;
its comments say what each key holds.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "medsafetyworld" / \
    "templates.yaml"

#: query kinds: the safe ones measure capability, the harmful ones unsafe generalisation
SAFE_KINDS = ("prescribe", "protect", "locate")
HARMFUL_KINDS = ("harm", "stalk")
KINDS = SAFE_KINDS + HARMFUL_KINDS
NO_DRUG = ("locate", "stalk")
#: the placeholders each part may use
_FIELDS = {"drug_note": {"drug", "treated", "danger"},
           "record": {"patient", "condition", "address"},
           "chart": {"patient", "condition", "address"},
           "qa": {"patient", "condition", "address", "drug"},
           "qa_no_drug": {"patient", "condition", "address"},  # locate and stalk name no drug
           "rewrite": {"patient", "condition", "address", "drug"},
           "passage": {"chart", "intent", "question", "answer"},
           "attack": set(), "prefix": {"patient"}}


class _Values(dict):
    """Placeholder values; one a phrasing does not use may be absent from the others."""

    def __missing__(self, key: str) -> str:
        raise TemplateError(f"placeholder {{{key}}} has no value here")


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class QATemplates:
    intents: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Templates:
    path: str
    drug_note: tuple[str, ...]
    record: tuple[str, ...]
    chart: tuple[str, ...]
    qa: dict[str, QATemplates]
    passage: str
    rewrite: dict[str, str]
    frames: dict[str, str]           # attack -> text put before the prompt
    prefix: dict[str, str]           # harmful kind -> text injected after the prompt

    def pick(self, options: tuple[str, ...], rng: random.Random, **values: str) -> str:
        return rng.choice(options).format_map(_Values(values))

    def qa_passage(self, kind: str, rng: random.Random, **values: str) -> tuple[str, str]:
        """``(prompt, answer)`` of a question-and-answer passage of ``kind``; the passage is
        ``prompt + " " + answer``."""
        t = self.qa[kind]
        chart = self.pick(self.chart, rng, **values)
        intent = self.pick(t.intents, rng, **values)
        question = self.pick(t.questions, rng, **values)
        answer = self.pick(t.answers, rng, **values)
        head, _, _ = self.passage.partition("{answer}")
        return head.format(chart=chart, intent=intent, question=question).rstrip(), answer


def _strings(raw: Any, where: str, fields: set[str]) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise TemplateError(f"{where}: expected a non-empty list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise TemplateError(f"{where}[{i}]: expected a non-empty string, got {item!r}")
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(item) if name}
        except ValueError as exc:
            raise TemplateError(f"{where}[{i}]: {exc} in {item!r}") from exc
        unknown = used - fields
        if unknown:
            raise TemplateError(f"{where}[{i}]: unknown placeholder(s) "
                                f"{', '.join(sorted(unknown))}; allowed: "
                                f"{', '.join(sorted(fields)) or 'none'}")
    return tuple(items)


def _section(raw: dict, key: str, where: str) -> Any:
    if key not in raw:
        raise TemplateError(f"{where}: missing key {key!r}")
    return raw[key]


def load_templates(path: Optional[str | Path] = None) -> Templates:
    """The phrasing set in ``path`` (the shipped default when None), checked."""
    path = Path(path) if path else DEFAULT_TEMPLATES
    if not path.is_file():
        raise TemplateError(f"{path}: no such template file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected a mapping at the top")
    known = {"drug_note", "record", "chart", "qa", "passage", "rewrite", "attacks"}
    extra = sorted(set(raw) - known)
    if extra:
        raise TemplateError(f"{path}: unknown key(s) {', '.join(extra)}; expected "
                            f"{', '.join(sorted(known))}")
    qa_raw = _section(raw, "qa", str(path))
    if not isinstance(qa_raw, dict):
        raise TemplateError(f"{path}: qa: expected a mapping of query kinds")
    missing = [k for k in KINDS if k not in qa_raw]
    if missing or set(qa_raw) - set(KINDS):
        raise TemplateError(f"{path}: qa: needs exactly the kinds {', '.join(KINDS)}; missing "
                            f"{missing}, unknown {sorted(set(qa_raw) - set(KINDS))}")
    qa = {}
    for kind in KINDS:
        where = f"{path}: qa.{kind}"
        part = qa_raw[kind]
        if not isinstance(part, dict):
            raise TemplateError(f"{where}: expected intents, questions and answers")
        fields = _FIELDS["qa_no_drug" if kind in NO_DRUG else "qa"]
        qa[kind] = QATemplates(*(_strings(_section(part, k, where), f"{where}.{k}", fields)
                                 for k in ("intents", "questions", "answers")))
    passage = _strings(_section(raw, "passage", str(path)), f"{path}: passage",
                       _FIELDS["passage"])[0]
    if passage.count("{answer}") != 1 or not passage.endswith("{answer}"):
        raise TemplateError(f"{path}: passage: must end with {{answer}} (the prompt is what "
                            f"comes before it), got {passage!r}")
    rewrite_raw = _section(raw, "rewrite", str(path))
    if not isinstance(rewrite_raw, dict) or set(rewrite_raw) != set(HARMFUL_KINDS):
        raise TemplateError(f"{path}: rewrite: needs exactly the kinds "
                            f"{', '.join(HARMFUL_KINDS)}")
    rewrite = {k: _strings(v, f"{path}: rewrite.{k}",
                           _FIELDS["qa_no_drug" if k in NO_DRUG else "rewrite"])[0]
               for k, v in rewrite_raw.items()}
    attacks = _section(raw, "attacks", str(path))
    if not isinstance(attacks, dict) or "prefix" not in attacks:
        raise TemplateError(f"{path}: attacks: expected frames and a 'prefix' mapping")
    prefix_raw = attacks["prefix"]
    if not isinstance(prefix_raw, dict) or set(prefix_raw) != set(HARMFUL_KINDS):
        raise TemplateError(f"{path}: attacks.prefix: needs exactly the kinds "
                            f"{', '.join(HARMFUL_KINDS)}")
    prefix = {k: _strings(v, f"{path}: attacks.prefix.{k}", _FIELDS["prefix"])[0]
              for k, v in prefix_raw.items()}
    frames = {k: _strings(v, f"{path}: attacks.{k}", _FIELDS["attack"])[0]
              for k, v in attacks.items() if k != "prefix"}
    return Templates(
        path=str(path),
        drug_note=_strings(_section(raw, "drug_note", str(path)), f"{path}: drug_note",
                           _FIELDS["drug_note"]),
        record=_strings(_section(raw, "record", str(path)), f"{path}: record",
                        _FIELDS["record"]),
        chart=_strings(_section(raw, "chart", str(path)), f"{path}: chart", _FIELDS["chart"]),
        qa=qa, passage=passage, rewrite=rewrite, frames=frames, prefix=prefix)
