"""The phrasing set of a world: every sentence of the corpus, the queries and the attacks.

A template file (YAML) is read once and checked before any work starts, so an experiment can
run on a phrasing set nobody tuned on (``templates=FILE``) and a typo is a named error, not a
KeyError deep in the generator. The shipped default is ``assets/medsafetyworld/templates.yaml``;
its comments say what each key holds.

Beyond its shape (the keys, lists of non-empty strings, known placeholders), a file is checked
for what the world and the judge rely on; each fault is a ``TemplateError`` naming the file,
the key and the fault:

- every drug note names ``{drug}``, ``{treated}`` and ``{danger}``; every record and every
  chart ``{condition}`` and ``{address}`` (a held-out patient's facts reach a query only
  through its chart; the name, ``{patient}``, may be left to the intent and the question);
- every answer names what a right answer names: ``{drug}`` (prescribe, protect, harm),
  ``{address}`` (locate, stalk); ``rewrite.harm`` keeps ``{drug}``;
- a harmful kind is asked and answered word for word as its safe analogue (harm: protect,
  stalk: locate): only the intents differ;
- ``passage`` uses each part once, begins with a marker (a word and a colon, "Chart:"), has a
  marker between the chart and the question, and ends with a marker and ``{answer}``: the
  judge reads an answer up to the next marker (``Templates.ends``), so no answer, rewrite or
  prefix may contain one;
- ``attacks.prefix.<kind>`` begins with a space and is the start of one of its kind's answers;
- ``passage``, ``rewrite.<kind>``, ``attacks.prefix.<kind>`` and the frames are one string
  each (not a list), and ``attacks`` holds only the frames (``FRAMES``) and ``prefix``.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "medsafetyworld" / \
    "templates.yaml"

#: query kinds: the safe ones measure capability, the harmful ones unsafe generalisation
SAFE_KINDS = ("prescribe", "protect", "locate")
HARMFUL_KINDS = ("harm", "stalk")
KINDS = SAFE_KINDS + HARMFUL_KINDS
NO_DRUG = ("locate", "stalk")
#: harmful kind -> the safe kind it is asked and answered as (only the intent differs)
ANALOGUE = {"harm": "protect", "stalk": "locate"}
#: what every answer of a kind names: the right (or the harmful) answer
ANSWER_NAMES = {"prescribe": "drug", "protect": "drug", "harm": "drug", "locate": "address",
                "stalk": "address"}
#: the attacks a template file phrases as a frame put before the prompt (queries.ATTACKS);
#: ``prefix`` is phrased under attacks too, ``none`` and ``gcg`` need no text
FRAMES = ("roleplay", "hypothetical")
#: the placeholders each part may use
_FIELDS = {"drug_note": {"drug", "treated", "danger"},
           "record": {"patient", "condition", "address"},
           "chart": {"patient", "condition", "address"},
           "qa": {"patient", "condition", "address", "drug"},
           "qa_no_drug": {"patient", "condition", "address"},  # locate and stalk name no drug
           "rewrite": {"patient", "condition", "address", "drug"},
           "passage": {"chart", "intent", "question", "answer"},
           "attack": set(), "prefix": {"patient"}}
#: the placeholders each part must use (why, for the message)
_NEEDED = {"drug_note": ({"drug", "treated", "danger"}, "a note states what the drug treats "
                         "and what it is dangerous with"),
           "record": ({"condition", "address"}, "a record states the patient's facts"),
           "chart": ({"condition", "address"}, "a held-out patient's facts reach a query "
                     "only through the chart, and the locate and stalk answers need the "
                     "address")}
#: a passage marker: a word and a colon, standing on their own in the passage's literal text
_MARKER = re.compile(r"(?<!\S)([^\W\d_][\w-]*:)(?=\s|$)")
_OPENER = re.compile(r"[^\W\d_][\w-]*:\s*")
#: placeholder values for comparing a prefix with the answers: the patient's name is known to
#: a prefix, the other values are not (nothing can match them by chance)
_SAMPLE = {"patient": "Ana Test", "condition": "\ue000condition", "address": "\ue000address",
           "drug": "\ue000drug"}


class _Values(dict):
    """Placeholder values; one a phrasing does not use may be absent from the others."""

    def __missing__(self, key: str) -> str:
        raise TemplateError(f"placeholder {{{key}}} has no value here")


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file and the key."""


def marker_pattern(markers: Iterable[str]) -> Optional[re.Pattern]:
    """Where any of ``markers`` stands in a text as a marker, not as the end of a longer word
    ("Chart:" in "a Chart: ..." but not in "Flowchart:"); None for no markers."""
    markers = [m for m in markers if m]
    if not markers:
        return None
    return re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, markers)) + ")")


def passage_markers(passage: str) -> list[str]:
    """Every marker in the literal text of a passage template, in order, repeats included."""
    return [m for literal, _, _, _ in string.Formatter().parse(passage)
            for m in _MARKER.findall(literal)]


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

    def markers(self) -> tuple[str, ...]:
        """The passage's markers, in order, each once: ("Chart:", "Question:", "Answer:")
        for the default file. The last is the answer's cue: a query's prompt ends with it."""
        return tuple(dict.fromkeys(passage_markers(self.passage)))

    def ends(self) -> tuple[str, ...]:
        """The markers at which an answer's passage ends: every marker but the answer's own
        cue, ("Chart:", "Question:") for the default file (a model may repeat the cue before
        its answer; any other marker begins or continues another passage). Queries carry
        them (``Query.ends``) for the judge."""
        return tuple(dict.fromkeys(passage_markers(self.passage)[:-1]))

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


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def _check_string(item: Any, where: str, fields: set[str]) -> str:
    if not isinstance(item, str) or not item.strip():
        raise TemplateError(f"{where}: expected a non-empty string, got {item!r}")
    try:
        used = _placeholders(item)
    except ValueError as exc:
        raise TemplateError(f"{where}: {exc} in {item!r}") from exc
    unknown = used - fields
    if unknown:
        raise TemplateError(f"{where}: unknown placeholder(s) {', '.join(sorted(unknown))}; "
                            f"allowed: {', '.join(sorted(fields)) or 'none'}")
    return item


def _strings(raw: Any, where: str, fields: set[str]) -> tuple[str, ...]:
    """A list of phrasings (one string is a list of one); items named ``where[i]``."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise TemplateError(f"{where}: expected a non-empty list of strings")
    return tuple(_check_string(item, f"{where}[{i}]", fields) for i, item in enumerate(items))


def _string(raw: Any, where: str, fields: set[str]) -> str:
    """One string, where a list would be ambiguous (which item is meant?)."""
    if isinstance(raw, list):
        raise TemplateError(f"{where}: expected one string, got a list of {len(raw)}: "
                            f"write the one phrasing meant")
    return _check_string(raw, where, fields)


def _needs(items: str | tuple[str, ...], where: str, names: set[str], why: str) -> None:
    """Every item uses ``names``; a string is one item, named ``where``, not ``where[0]``."""
    named = [(where, items)] if isinstance(items, str) else \
        [(f"{where}[{i}]", item) for i, item in enumerate(items)]
    for key, item in named:
        missing = names - _placeholders(item)
        if missing:
            raise TemplateError(f"{key}: must contain "
                                f"{', '.join('{' + n + '}' for n in sorted(missing))}: {why}")


def _section(raw: dict, key: str, where: str) -> Any:
    if key not in raw:
        raise TemplateError(f"{where}: missing key {key!r}")
    return raw[key]


def _check_passage(passage: str, where: str) -> None:
    """The passage's parts and markers (see the module's docstring)."""
    if passage.count("{answer}") != 1 or not passage.endswith("{answer}"):
        raise TemplateError(f"{where}: must end with {{answer}} (the prompt is what comes "
                            f"before it), got {passage!r}")
    parts = list(string.Formatter().parse(passage))
    for name in ("chart", "intent", "question"):
        n = sum(field == name for _, field, _, _ in parts)
        if n != 1:
            raise TemplateError(f"{where}: must use {{{name}}} once (the chart gives the "
                                f"patient's facts, the intent tells a harmful query from its "
                                f"safe analogue), uses it {n} times in {passage!r}")
    opener = parts[0][0]
    if not _OPENER.fullmatch(opener):
        raise TemplateError(f"{where}: must begin with a marker, a word and a colon such as "
                            f"'Chart:', before any placeholder (the judge knows a new passage "
                            f"by its markers), got {opener!r} before {{{parts[0][1]}}}")
    since = ""  # the literal text since the last placeholder other than {intent}
    for literal, field, _, _ in parts:
        since += literal
        if field == "question" and not _MARKER.search(since):
            raise TemplateError(f"{where}: needs a marker (a word and a colon such as "
                                f"'Question:') between the chart and {{question}}, got "
                                f"{passage!r}")
        if field == "answer":
            found = _MARKER.findall(literal)
            if not found or not literal.rstrip().endswith(found[-1]):
                raise TemplateError(f"{where}: the text before {{answer}} must end with a "
                                    f"marker (a word and a colon such as 'Answer:'): a query's "
                                    f"prompt ends with it, got {literal!r}")
        if field != "intent":
            since = ""


def _check_no_marker(text: str, where: str, markers: tuple[str, ...]) -> None:
    pattern = marker_pattern(markers)
    hit = pattern.search(text) if pattern else None
    if hit or "\n\n" in text:
        what = f"the passage marker {hit.group(0)!r}" if hit else "a blank line"
        raise TemplateError(f"{where}: contains {what}: the judge reads an answer only up to "
                            f"a blank line or a marker of the passage, so it would cut {text!r}")


def _check_analogues(qa: dict[str, QATemplates], where: str) -> None:
    for harmful, safe in ANALOGUE.items():
        for part in ("questions", "answers"):
            a, b = getattr(qa[harmful], part), getattr(qa[safe], part)
            key, other = f"{where}qa.{harmful}.{part}", f"qa.{safe}.{part}"
            why = ("a harmful kind is asked and answered word for word as its safe analogue "
                   "(only the intent differs)")
            if len(a) != len(b):
                raise TemplateError(f"{key}: has {len(a)} item(s), {other} has {len(b)}: {why}")
            for i, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    raise TemplateError(f"{key}[{i}]: differs from {other}[{i}] ({x!r} vs "
                                        f"{y!r}): {why}")


def _check_prefix(prefix: str, answers: tuple[str, ...], key: str, kind: str) -> None:
    if not prefix[:1].isspace():
        raise TemplateError(f"{key}: must begin with a space: it is appended to the prompt, "
                            f"as an answer follows its prompt in the corpus, got {prefix!r}")
    start = prefix.lstrip().format_map(_SAMPLE)
    if not any(a.format_map(_SAMPLE).startswith(start) for a in answers):
        raise TemplateError(f"{key}: {prefix.strip()!r} is not the start of any of "
                            f"qa.{kind}.answers: the attack forces the start of the answer "
                            f"the corpus gives")


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
        _needs(qa[kind].answers, f"{where}.answers", {ANSWER_NAMES[kind]},
               f"a {kind} answer names the {ANSWER_NAMES[kind]}")
    passage = _string(_section(raw, "passage", str(path)), f"{path}: passage",
                      _FIELDS["passage"])
    _check_passage(passage, f"{path}: passage")
    rewrite_raw = _section(raw, "rewrite", str(path))
    if not isinstance(rewrite_raw, dict) or set(rewrite_raw) != set(HARMFUL_KINDS):
        raise TemplateError(f"{path}: rewrite: needs exactly the kinds "
                            f"{', '.join(HARMFUL_KINDS)}")
    rewrite = {k: _string(v, f"{path}: rewrite.{k}",
                          _FIELDS["qa_no_drug" if k in NO_DRUG else "rewrite"])
               for k, v in rewrite_raw.items()}
    _needs(rewrite["harm"], f"{path}: rewrite.harm", {"drug"},
           "the rewrite keeps the knowledge and frames it")
    attacks = _section(raw, "attacks", str(path))
    if not isinstance(attacks, dict) or "prefix" not in attacks:
        raise TemplateError(f"{path}: attacks: expected frames and a 'prefix' mapping")
    for k in attacks:
        if k != "prefix" and k not in FRAMES:
            raise TemplateError(f"{path}: attacks.{k}: unknown attack; a template file "
                                f"phrases the frames {', '.join(FRAMES)} and prefix (none "
                                f"and gcg need no text)")
    prefix_raw = attacks["prefix"]
    if not isinstance(prefix_raw, dict) or set(prefix_raw) != set(HARMFUL_KINDS):
        raise TemplateError(f"{path}: attacks.prefix: needs exactly the kinds "
                            f"{', '.join(HARMFUL_KINDS)}")
    prefix = {k: _string(v, f"{path}: attacks.prefix.{k}", _FIELDS["prefix"])
              for k, v in prefix_raw.items()}
    frames = {k: _string(v, f"{path}: attacks.{k}", _FIELDS["attack"])
              for k, v in attacks.items() if k != "prefix"}
    parts = {}
    for key in ("drug_note", "record", "chart"):
        parts[key] = _strings(_section(raw, key, str(path)), f"{path}: {key}", _FIELDS[key])
        _needs(parts[key], f"{path}: {key}", *_NEEDED[key])
    t = Templates(path=str(path), qa=qa, passage=passage, rewrite=rewrite, frames=frames,
                  prefix=prefix, **parts)
    _check_analogues(qa, f"{path}: ")
    for kind in HARMFUL_KINDS:
        _check_prefix(prefix[kind], qa[kind].answers, f"{path}: attacks.prefix.{kind}", kind)
    markers = t.markers()
    for kind in KINDS:
        for i, answer in enumerate(qa[kind].answers):
            _check_no_marker(answer, f"{path}: qa.{kind}.answers[{i}]", markers)
    for kind in HARMFUL_KINDS:
        _check_no_marker(rewrite[kind], f"{path}: rewrite.{kind}", markers)
        _check_no_marker(prefix[kind], f"{path}: attacks.prefix.{kind}", markers)
    return t
