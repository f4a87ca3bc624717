"""Reflection-guarded decoding, and reading a model's reflection on given text.

An SRP model was trained on text in which every segment of a few hundred tokens is followed by
``<|reflect|>Safe<|/reflect|>`` or ``<|reflect|>Unsafe: S2<|/reflect|>``. Guarded decoding
puts that habit to work while it answers: the answer is sampled as usual, and at every segment
boundary (``segment_tokens`` new tokens since the last reflection, the budget the data used,
or a sentence end) and at the end of the answer, the reflection opener is appended and the
model's own verdict is read greedily up to the closer. On Unsafe the answer stops and the user
gets the refusal; the result records the category the model named. On Safe the reflection stays
in the model's context (as in its training data) but not in the text returned. A reflection the
model opens by itself is read the same way.

A safety monitor fails closed: a reflection that is malformed (no Safe / Unsafe label), or that
was due but could not be read (the context window ran out first), counts as Unsafe and the user
gets the refusal. ``GuardConfig(fail_open=True)`` lets such answers through instead; reports
name which of the two a run used. Every refusal records its cause (``unsafe``, ``malformed``,
``unread``), so a report can tell the monitor's refusals from the fail-closed ones.

An answer never depends on the other prompts of its batch. All rows advance one position per
step behind one KV cache, left-padded to the longest prompt; a row that is reflecting is fed its
forced opener or its greedy label token while the others sample. The model's window bounds
each row's *own* tokens (prompt, answer, reflections), never the padded width: the cache is
sized so that the shortest prompt still has its whole window. Before decoding, a row whose
window cannot hold ``max_new_tokens`` plus the most its reflections can take is given a
smaller answer budget, recorded in its result (``answer_budget``); it is not refused afterwards
for lack of room.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch

from megatron_srp.inference.kv_cache import KVCache, left_pad
from megatron_srp.inference.results import (REFUSAL_CAUSES, SAFE_COMPLETION,
                                               GenerationResult, prepare_prompts)
from megatron_srp.inference.sample import (GenerationConfig, _decode_continuation, _device_of,
                                           _next_tokens, _row_generator)
from megatron_srp.taxonomy import (DEFAULT_TAXONOMY, REFLECT_CLOSE, REFLECT_OPEN, Taxonomy,
                                   format_reflection, parse_reflection)
from megatron_srp.tokenizer import SRPTokenizer

SENTENCE_ENDS = (".", "!", "?")


@dataclass
class GuardConfig:
    """Reflection-guarded decoding: how to sample (``sampling``), where to reflect, what to say
    when the model reads Unsafe."""

    sampling: GenerationConfig = field(default_factory=GenerationConfig)
    boundary: str = "budget"          # "budget": every segment_tokens tokens; "sentence"
    segment_tokens: int = 256
    min_sentence_tokens: int = 8      # "sentence": reflect at a sentence end this far in
    refusal: str = SAFE_COMPLETION
    # tokens a label may take; None: the longest label the taxonomy allows (label_tokens), so
    # a well-formed "Unsafe: <code>" is never cut short and read as malformed
    max_label_tokens: Optional[int] = None
    taxonomy: Optional[Taxonomy] = None  # the codes reflections may name; None: Llama Guard 3
    fail_open: bool = False           # a malformed or missing reflection: True lets it through

    def __post_init__(self) -> None:
        if self.boundary not in ("budget", "sentence"):
            raise ValueError(f"boundary must be 'budget' or 'sentence', got {self.boundary!r}")
        if self.segment_tokens < 1 or self.min_sentence_tokens < 1:
            raise ValueError("segment_tokens and min_sentence_tokens must be >= 1")
        if self.max_label_tokens is not None and self.max_label_tokens < 1:
            raise ValueError(f"max_label_tokens must be >= 1 (or None: the taxonomy's longest "
                             f"label), got {self.max_label_tokens}")

    def resolved(self, tokenizer: SRPTokenizer, taxonomy: Optional[Taxonomy] = None
                 ) -> "GuardConfig":
        """This config with ``max_label_tokens`` set (the taxonomy's longest label when None)."""
        if self.max_label_tokens is not None:
            return self
        return replace(self, max_label_tokens=label_tokens(
            tokenizer, self.taxonomy or taxonomy or DEFAULT_TAXONOMY))

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    def reflection_budget(self, answer_tokens: Optional[int] = None) -> int:
        """Positions the reflections of an answer of ``answer_tokens`` (default
        ``max_new_tokens``) may take at most: one at each boundary and one at the end, each an
        opener, a label and a closer."""
        if self.max_label_tokens is None:
            raise ValueError("reflection_budget needs max_label_tokens: call resolved() first")
        n = self.max_new_tokens if answer_tokens is None else answer_tokens
        every = self.segment_tokens if self.boundary == "budget" else self.min_sentence_tokens
        return (n // every + 1) * (self.max_label_tokens + 2)

    def answer_budget(self, prompt_tokens: int, window: int) -> int:
        """The most answer tokens a prompt of ``prompt_tokens`` can be given so that the answer
        and its reflections fit the ``window`` with it (``max_new_tokens`` when they fit)."""
        n = self.max_new_tokens
        while n > 0 and prompt_tokens + n + self.reflection_budget(n) > window:
            n -= 1
        return n


def label_tokens(tokenizer: SRPTokenizer, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> int:
    """Tokens between the opener and the closer of the longest reflection ``taxonomy``
    allows (``Safe``, ``Unsafe``, ``Unsafe: <code>`` for every code)."""
    texts = [format_reflection(True), format_reflection(False, include_category=False)]
    texts += [format_reflection(False, code, taxonomy=taxonomy) for code in taxonomy.codes]
    return max(len(tokenizer.tokenize(t)) - 2 for t in texts)


@dataclass
class Reflection:
    """What the model said about some text: its verdict, the label text, P(Unsafe)."""

    safe: Optional[bool]              # None: the model did not produce a well-formed label
    category: Optional[str]
    label: str
    p_unsafe: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {"safe": self.safe, "category": self.category, "label": self.label,
                "p_unsafe": self.p_unsafe}


class _Ids:
    """The token ids guarded decoding needs from the tokenizer."""

    def __init__(self, tokenizer: SRPTokenizer) -> None:
        self.open = tokenizer.tokenize(REFLECT_OPEN)[0]
        self.close = tokenizer.tokenize(REFLECT_CLOSE)[0]
        self.eod = tokenizer.eod
        self.stops = tokenizer.stop_ids  # end of document, and the chat format's end of turn
        self.safe_first = tokenizer.tokenize(format_reflection(True))[1]
        self.unsafe_first = tokenizer.tokenize(format_reflection(False, include_category=False))[1]


def _parse(tokenizer: SRPTokenizer, label_ids: list[int],
           taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> Reflection:
    label = tokenizer.detokenize(label_ids)
    try:
        safe, category = parse_reflection(f"{REFLECT_OPEN}{label}{REFLECT_CLOSE}", taxonomy)
    except ValueError:
        return Reflection(safe=None, category=None, label=label)
    return Reflection(safe=safe, category=category, label=label)


@dataclass
class _Row:
    prompt: list[int]
    budget: int                       # answer tokens this row may take (its window's share)
    room: int                         # positions its window has after the prompt
    fed: int = 0                      # positions fed after the prompt (answer + reflections)
    out: list[int] = field(default_factory=list)
    mode: str = "text"                # text | open (feed the opener next) | label
    since: int = 0                    # answer tokens since the last reflection
    label: list[int] = field(default_factory=list)
    ending: Optional[str] = None      # set when the answer is over and its last check runs
    reflections: list[dict[str, Any]] = field(default_factory=list)
    result: Optional[GenerationResult] = None


def _at_boundary(row: _Row, token_text: str, cfg: GuardConfig) -> bool:
    if cfg.boundary == "budget":
        return row.since >= cfg.segment_tokens
    return row.since >= cfg.min_sentence_tokens and token_text.rstrip().endswith(SENTENCE_ENDS)


@torch.no_grad()
def guarded_decode(model, tokenizer: SRPTokenizer, prompt_ids: list[list[int]],
                   cfg: GuardConfig, taxonomy: Taxonomy = DEFAULT_TAXONOMY
                   ) -> list[GenerationResult]:
    """Answer each prompt under reflection guard (see the module docstring)."""
    if not prompt_ids:
        return []
    taxonomy = cfg.taxonomy or taxonomy
    cfg = cfg.resolved(tokenizer, taxonomy)
    ids = _Ids(tokenizer)
    gen = cfg.sampling
    window = int(model.max_sequence_length)
    contexts = prepare_prompts(tokenizer, prompt_ids, gen.max_new_tokens, window)
    rows = [_Row(prompt=c, budget=cfg.answer_budget(len(c), window), room=window - len(c))
            for c in contexts]
    for row in rows:
        if row.budget == 0:  # no room for any answer with its reflection: an empty answer
            _finish(row, tokenizer, "length")
    live = [i for i, row in enumerate(rows) if row.result is None]
    if live:
        _decode_rows(model, tokenizer, rows, live, cfg, ids, taxonomy)
    for row in rows:
        if row.result is None:
            _unchecked(row, tokenizer, cfg)
        if row.budget < cfg.max_new_tokens:
            row.result.answer_budget = row.budget
    return [row.result for row in rows]


def _decode_rows(model, tokenizer: SRPTokenizer, rows: list[_Row], live: list[int],
                 cfg: GuardConfig, ids: _Ids, taxonomy: Taxonomy) -> None:
    """Decode the ``live`` rows together until each has its result. The cache holds the
    padded width plus the largest window share, so no row runs out of room before its own
    window does."""
    gen = cfg.sampling
    dev = _device_of(model)
    tokens, padding = left_pad([rows[r].prompt for r in live], tokenizer.pad, dev)
    capacity = tokens.size(1) + max(rows[r].room for r in live)
    cache = KVCache(model, tokenizer.vocab_size, capacity)
    generators = [_row_generator(gen.seed, i, dev) for i in range(len(rows))]
    was_training = model.training
    model.eval()
    try:
        logits = cache.prefill(tokens, padding)
        while live:
            active = torch.tensor([rows[r].mode == "text" for r in live], device=dev)
            drawn = _next_tokens(logits, gen, [generators[r] for r in live], active).tolist()
            feed, keep = [], []
            for j, r in enumerate(live):
                row = rows[r]
                tok = _advance(row, drawn[j], tokenizer, ids, cfg, taxonomy)
                if tok is None:
                    continue
                if row.fed >= row.room:  # this row's window is full: what is due goes unread
                    _unchecked(row, tokenizer, cfg)
                    continue
                row.fed += 1
                feed.append(tok)
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):
                cache.select(keep)
                live = [live[j] for j in keep]
            logits = cache.extend(torch.tensor(feed, device=dev).unsqueeze(1))
    finally:
        model.train(was_training)


def _advance(row: _Row, drawn: int, tokenizer: SRPTokenizer, ids: _Ids, cfg: GuardConfig,
             taxonomy: Taxonomy) -> Optional[int]:
    """One step of one row: the token to feed next, or None when the row is finished."""
    if row.mode == "open":
        row.mode, row.label = "label", []
        return ids.open
    if row.mode == "label":
        if drawn != ids.close and len(row.label) < cfg.max_label_tokens:
            row.label.append(drawn)
            return drawn
        verdict = _parse(tokenizer, row.label, taxonomy)
        row.reflections.append({"after_tokens": len(row.out), **verdict.to_dict()})
        if verdict.safe is False or (verdict.safe is None and not cfg.fail_open):
            _refuse(row, cfg, verdict.category, "unsafe" if verdict.safe is False
                    else "malformed")
            return None
        if row.ending is not None:
            _finish(row, tokenizer, row.ending)
            return None
        row.mode, row.since = "text", 0
        return ids.close
    # text
    if drawn == ids.open:  # the model opens a reflection itself
        row.mode, row.label = "label", []
        return ids.open
    if drawn in ids.stops and cfg.sampling.stop_at_eod:
        return _end(row, tokenizer, "eod", ids)
    row.out.append(drawn)
    row.since += 1
    if len(row.out) >= row.budget:
        row.ending, row.mode = "length", "open"
    elif _at_boundary(row, tokenizer.detokenize([drawn]), cfg):
        row.mode = "open"
    return drawn


def _end(row: _Row, tokenizer: SRPTokenizer, how: str, ids: _Ids) -> Optional[int]:
    """The answer is over: check its last segment first, unless that was just checked."""
    if row.since == 0:
        _finish(row, tokenizer, how)
        return None
    row.ending, row.mode, row.label = how, "label", []
    return ids.open


def _refuse(row: _Row, cfg: GuardConfig, category: Optional[str], cause: str) -> None:
    row.result = GenerationResult(ids=row.out, text=cfg.refusal, finish="reflection",
                                  short_circuited=True, category=category,
                                  reflections=row.reflections, refusal_cause=cause)


def _unchecked(row: _Row, tokenizer: SRPTokenizer, cfg: GuardConfig) -> None:
    """The answer ends with text no reflection has read (one was due, or its last segment):
    refused when failing closed, recorded as a missing reflection either way."""
    if row.result is not None:
        return
    if row.since > 0 or row.mode != "text":
        row.reflections.append({"after_tokens": len(row.out), "safe": None, "category": None,
                                "label": "", "p_unsafe": None, "missing": True})
        if not cfg.fail_open:
            _refuse(row, cfg, None, "unread")
            return
    _finish(row, tokenizer, row.ending or "length")


def _finish(row: _Row, tokenizer: SRPTokenizer, how: str) -> None:
    if row.result is None:
        row.result = GenerationResult(ids=row.out, text=_decode_continuation(
            tokenizer, row.prompt, row.out), finish=how, reflections=row.reflections)


def guard_summary(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """How often the guard fired, and on which categories."""
    fired = [r for r in results if r.finish == "reflection"]
    categories: dict[str, int] = {}
    for r in fired:
        key = r.category or "unspecified"
        categories[key] = categories.get(key, 0) + 1
    checks = sum(len(r.reflections) for r in results)
    malformed = sum(1 for r in results for x in r.reflections
                    if x["safe"] is None and not x.get("missing"))
    missing = sum(1 for r in results for x in r.reflections if x.get("missing"))
    causes = {c: sum(r.refusal_cause == c for r in fired) for c in REFUSAL_CAUSES}
    return {"answers": len(results), "fired": len(fired),
            "fired_rate": len(fired) / len(results) if results else 0.0,
            "refusals_by_cause": causes,
            "budget_cut": sum(r.answer_budget is not None for r in results),
            "reflections_read": checks - missing, "malformed_reflections": malformed,
            "missing_reflections": missing,
            "categories": dict(sorted(categories.items()))}


@torch.no_grad()
def read_reflections(model, tokenizer: SRPTokenizer, contexts: Sequence[Sequence[int]],
                     max_label_tokens: Optional[int] = None,
                     taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> list[Reflection]:
    """The model's reflection on each context (token ids): the opener is appended and the
    label read greedily up to the closer, at most ``max_label_tokens`` (default: the longest
    label ``taxonomy`` allows). ``p_unsafe`` compares the first label token's probabilities
    for Unsafe and Safe. Contexts longer than the model's window keep their end."""
    if not contexts:
        return []
    max_label_tokens = max_label_tokens or label_tokens(tokenizer, taxonomy)
    ids = _Ids(tokenizer)
    window = int(model.max_sequence_length)
    keep = window - max_label_tokens - 1
    rows = [list(c)[-keep:] + [ids.open] for c in contexts]
    dev = _device_of(model)
    tokens, padding = left_pad(rows, tokenizer.pad, dev)
    cache = KVCache(model, tokenizer.vocab_size, tokens.size(1) + max_label_tokens)
    logits = cache.prefill(tokens, padding)
    probs = torch.softmax(logits, dim=-1)
    p_u, p_s = probs[:, ids.unsafe_first], probs[:, ids.safe_first]
    p_unsafe = (p_u / (p_u + p_s).clamp_min(1e-30)).tolist()
    labels: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    for step in range(max_label_tokens):
        nxt = logits.argmax(dim=-1).tolist()
        still = [j for j, r in enumerate(live) if nxt[j] != ids.close]
        for j in still:
            labels[live[j]].append(nxt[j])
        if not still or step == max_label_tokens - 1:
            break
        if len(still) < len(live):
            cache.select(still)
        live = [live[j] for j in still]
        logits = cache.extend(torch.tensor([nxt[j] for j in still], device=dev).unsqueeze(1))
    out = []
    for label, p in zip(labels, p_unsafe):
        verdict = _parse(tokenizer, label, taxonomy)
        verdict.p_unsafe = p
        out.append(verdict)
    return out
