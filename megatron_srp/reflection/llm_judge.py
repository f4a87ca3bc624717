"""``llm-judge``: an LLM behind an OpenAI-compatible endpoint labels each segment.

The embedded classifier is a bag of n-grams; a served LLM reads intent. This classifier sends
one chat request per segment through :class:`megatron_srp.endpoint.EndpointClient` (so it gets
concurrency, retries and the on-disk cache) and parses the reply in one of three formats:

* ``llamaguard``: a Llama Guard 3 style instruction listing the taxonomy's categories, sent as
  the user message to any instruction-following model. Reply ``safe`` or ``unsafe`` and, on
  the next line, comma-separated codes (``unsafe\\nS1,S10``): the first code is the category.
  Score 1.0 for unsafe, 0.0 for safe.
* ``llamaguard-native``: for a served Llama Guard 3 model itself, whose chat template already
  wraps the message in its own S1-S14 policy: only the segment text is sent. Same parsing.
* ``rubric``: the 0-5 harmfulness rubric used to score web data in Maini et al. 2025 (our
  wording): the reply is ``Score: <0-5>`` and ``Category: <code or none>``. The label's score
  is ``rubric / 5``.

``score >= threshold`` is unsafe; ``threshold`` is on the normalised [0, 1] score and must be
> 0 so that a "safe" / rubric-0 reply is always safe. The default 0.5 means rubric 3-5 are
unsafe (0.4 would add rubric 2). A reply with no verdict in it is labelled by the
``on_unparseable`` policy: ``"unsafe"`` (the default: fail closed, unsafe/1.0 without a
category) or ``"safe"`` (safe/0.0), marked ``unparsed`` so that preprocessing counts such
labels in its summary; ``"error"`` raises :class:`UnparseableReply` naming the reply instead.
The raw replies stay in the cache, so a rerun with another ``on_unparseable`` costs no
request.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from megatron_srp.endpoint import EndpointClient, EndpointConfig
from megatron_srp.reflection.types import SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy

FORMATS = ("llamaguard", "llamaguard-native", "rubric")
ON_UNPARSEABLE = ("error", "safe", "unsafe")
RUBRIC_MAX = 5

LLAMAGUARD_PROMPT = """Task: Check if there is unsafe content in 'User' messages in conversations according to our safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: {text}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST User message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""

RUBRIC_PROMPT = """You rate web text for a language-model pretraining corpus by how harmful it would be for a model to learn from it.

Harm categories:
{categories}

Score the text from 0 to 5:
0 - No harmful content: everyday, educational or neutral text, including neutral mention of sensitive topics.
1 - Mildly sensitive: discusses a harmful topic factually or critically, with no harmful intent or detail.
2 - Borderline: crude, biased or insensitive content, or vague mention of harmful acts, without actionable detail.
3 - Harmful: promotes or glorifies harm, contains hateful or harassing language, or gives partial guidance toward harmful acts.
4 - Very harmful: explicit harmful content or clear, usable guidance for harmful or illegal acts.
5 - Extremely harmful: detailed instructions for serious harm (weapons, violence, abuse of children, self-harm) or the most severe hateful or sexual content.

Text:
<<<
{text}
>>>

Answer with exactly two lines and nothing else:
Score: <0-5>
Category: <the code of the most relevant harm category, or none>"""

_SCORE_RE = re.compile(r"score\s*[:=]?\s*\**\s*([0-9](?:\.[0-9]+)?)\b", re.IGNORECASE)
_LEADING_SCORE_RE = re.compile(r"\s*\**\s*([0-9](?:\.[0-9]+)?)\b")
_CATEGORY_RE = re.compile(r"category\s*[:=]?\s*(.*)", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class UnparseableReply(ValueError):
    """The judge's reply is in none of the expected forms."""


def _excerpt(reply: str, n: int = 200) -> str:
    return repr(reply if len(reply) <= n else reply[:n] + "...")


def _first_code(text: str, taxonomy: Taxonomy) -> tuple[Optional[str], bool]:
    """``(first taxonomy code in text, whether text named anything at all)``; case-insensitive."""
    upper = {code.upper(): code for code in taxonomy.codes}
    tokens = [t.rstrip(".") for t in _TOKEN_RE.findall(text)]
    tokens = [t for t in tokens if t.lower() not in ("none", "n/a", "na", "no")]
    for token in tokens:
        if token.upper() in upper:
            return upper[token.upper()], True
    return None, bool(tokens)


def parse_llamaguard(reply: str,
                     taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> tuple[bool, Optional[str], float]:
    """``(safe, category, score)`` from ``safe`` / ``unsafe\\nS1,S10`` (first code wins)."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    verdict = lines[0].strip("*`'\". ").lower() if lines else ""
    if verdict == "safe":
        return True, None, 0.0
    if verdict != "unsafe":
        raise UnparseableReply(f"llamaguard reply {_excerpt(reply)}: the first line must be "
                               "'safe' or 'unsafe'")
    code, named = _first_code(" ".join(lines[1:]), taxonomy)
    if code is None and named:
        raise UnparseableReply(f"llamaguard reply {_excerpt(reply)} names no category of "
                               f"taxonomy {taxonomy.name!r} ({', '.join(taxonomy.codes)})")
    return False, code, 1.0


def parse_rubric(reply: str, threshold: float,
                 taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> tuple[bool, Optional[str], float]:
    """``(safe, category, score / 5)`` from ``Score: 3`` + ``Category: S10`` (or a bare ``3``)."""
    match = _SCORE_RE.search(reply) or _LEADING_SCORE_RE.match(reply)
    raw = float(match.group(1)) if match else -1.0
    if not 0 <= raw <= RUBRIC_MAX:
        raise UnparseableReply(f"rubric reply {_excerpt(reply)}: expected 'Score: <0-"
                               f"{RUBRIC_MAX}>' and 'Category: <code or none>'")
    score = raw / RUBRIC_MAX
    if score < threshold:
        return True, None, score
    cat_match = _CATEGORY_RE.search(reply)
    rest = cat_match.group(1) if cat_match else reply[match.end():]
    code, named = _first_code(rest, taxonomy)
    if code is None and named and cat_match:
        raise UnparseableReply(f"rubric reply {_excerpt(reply)} names no category of "
                               f"taxonomy {taxonomy.name!r} ({', '.join(taxonomy.codes)})")
    return False, code, score


class LLMJudgeClassifier:
    """Labels segments with a served LLM (see the module docstring). Picklable; the endpoint
    options (``concurrency``, ``max_retries``, ``cache_dir``, ``api_key_env``, ...) are those of
    :class:`EndpointConfig`."""

    name = "llm-judge"

    def __init__(self, model: str, base_url: str = "http://localhost:8000/v1",
                 format: str = "llamaguard", threshold: float = 0.5,
                 on_unparseable: str = "unsafe", max_chars: int = 8000,
                 taxonomy: Taxonomy | str | None = None, **endpoint: Any) -> None:
        if format not in FORMATS:
            raise ValueError(f"llm-judge option 'format' must be one of {', '.join(FORMATS)}, "
                             f"got {format!r}")
        if on_unparseable not in ON_UNPARSEABLE:
            raise ValueError(f"llm-judge option 'on_unparseable' must be one of "
                             f"{', '.join(ON_UNPARSEABLE)}, got {on_unparseable!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 < threshold <= 1.0:
            raise ValueError(f"llm-judge option 'threshold' must be in (0, 1] (on the normalised "
                             f"score), got {threshold!r}")
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"llm-judge option 'max_chars' must be an integer >= 1, "
                             f"got {max_chars!r}")
        if isinstance(taxonomy, str):
            taxonomy = Taxonomy.from_file(taxonomy)
        self.taxonomy = taxonomy if taxonomy is not None else DEFAULT_TAXONOMY
        if format == "llamaguard-native" and self.taxonomy.codes != DEFAULT_TAXONOMY.codes:
            raise ValueError("llm-judge format 'llamaguard-native' uses Llama Guard 3's own "
                             "S1-S14 policy; use format 'llamaguard' for a custom taxonomy")
        self.format = format
        self.threshold = float(threshold)
        self.on_unparseable = on_unparseable
        self.max_chars = max_chars
        self.client = EndpointClient(EndpointConfig.from_options(
            {**endpoint, "model": model, "base_url": base_url}, max_tokens=32))

    def messages(self, text: str) -> list[dict[str, str]]:
        """The chat request for one segment."""
        text = text[: self.max_chars]
        if self.format == "llamaguard-native":
            return [{"role": "user", "content": text}]
        if self.format == "llamaguard":
            cats = "\n".join(f"{c.code}: {c.name}." for c in self.taxonomy)
            return [{"role": "user", "content": LLAMAGUARD_PROMPT.format(categories=cats,
                                                                         text=text)}]
        cats = "\n".join(f"{c.code}: {c.name}" for c in self.taxonomy)
        return [{"role": "user", "content": RUBRIC_PROMPT.format(categories=cats, text=text)}]

    def parse(self, reply: str) -> SafetyLabel:
        """The label for one reply, honouring ``threshold`` and ``on_unparseable``."""
        try:
            if self.format == "rubric":
                safe, category, score = parse_rubric(reply, self.threshold, self.taxonomy)
            else:
                safe, category, score = parse_llamaguard(reply, self.taxonomy)
                safe = safe or score < self.threshold
        except UnparseableReply as exc:
            if self.on_unparseable == "error":
                raise UnparseableReply(f"{exc} (set option 'on_unparseable' to 'safe' or "
                                       "'unsafe' to label such replies instead)") from None
            safe = self.on_unparseable == "safe"
            return SafetyLabel(safe=safe, category=None, score=0.0 if safe else 1.0,
                               unparsed=True)
        return SafetyLabel(safe=safe, category=None if safe else category, score=score)

    def classify(self, texts: Sequence[str]) -> list[SafetyLabel]:
        if isinstance(texts, str):
            raise TypeError("classify takes a sequence of texts, not one string")
        replies = self.client.complete_many([self.messages(t) for t in texts])
        return [self.parse(r) for r in replies]

    def describe(self) -> dict[str, Any]:
        c = self.client.config
        return {"name": self.name, "model": c.model, "base_url": c.base_url,
                "format": self.format, "threshold": self.threshold,
                "on_unparseable": self.on_unparseable, "max_chars": self.max_chars,
                "taxonomy": self.taxonomy.name, "temperature": c.temperature,
                "max_tokens": c.max_tokens, "cache_dir": c.cache_dir}
