"""LLM-written rewrites and refusal dialogues, through an OpenAI-compatible endpoint.

Maini et al. 2025 rewrite unsafe web text with an LLM (SafeWeb: keep the knowledge, say why it
is harmful, redirect) and turn the most harmful passages into request -> refusal dialogues
(RefuseWeb). The template writers in ``rewrite.py`` / ``refusal.py`` are offline stand-ins; the
classes here are the real thing, plugged in through the same hooks:

* :class:`EndpointRewriter` implements the ``Rewriter`` protocol:
  ``Rewrite(options, rewriter=EndpointRewriter(model=...))``, or from a config
  ``build_intervention("rewrite", rewriter="endpoint", endpoint={"model": ...})``.
* :class:`EndpointDialogueWriter` writes the ``Refusal`` dialogues:
  ``Refusal(options, writer=EndpointDialogueWriter(model=...))``, or
  ``build_intervention("refusal", writer="endpoint", endpoint={"model": ...})``.

Both send temperature-0 requests through :class:`megatron_srp.endpoint.EndpointClient`, so a
rerun reads every reply back from the cache: the output is deterministic given the cache. Both
also offer a batched method (``rewrite_many`` / ``dialogue_many``) that the interventions use
to send a document's segments concurrently.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from megatron_srp.endpoint import EndpointClient, EndpointConfig
from megatron_srp.interventions.base import category_name
from megatron_srp.reflection.types import SafetyLabel
from megatron_srp.taxonomy import DEFAULT_TAXONOMY, Taxonomy

REWRITE_SYSTEM = ("You rewrite passages of web text for the pretraining corpus of a safe "
                  "language model.")
REWRITE_PROMPT = """The passage below was flagged as potentially harmful: {topic}.

Rewrite it so that it:
1. keeps the factual and educational knowledge it contains, but no operational detail that would help someone cause harm (no step-by-step instructions, quantities, recipes, targets or slurs);
2. says plainly why this content is harmful and whom it can hurt;
3. redirects the reader to safe, constructive alternatives or to sources of help.

Keep the language of the passage and a neutral, informative tone; make it about as long as the original. Reply with the rewritten passage only.

Passage:
<<<
{text}
>>>"""

DIALOGUE_SYSTEM = ("You write training dialogues in which an assistant refuses harmful "
                   "requests helpfully and explains why.")
DIALOGUE_PROMPT = """The passage below was flagged as harmful: {topic}.

Write a short dialogue with exactly two turns:
- a User turn: a realistic request that asks for the harmful content of the passage;
- an Assistant turn: a refusal that names the kind of harm, explains briefly why helping could hurt people, and offers a safe alternative. It must not repeat any harmful detail.

Answer in exactly this form and nothing else:
User: <the request>
Assistant: <the refusal>

Passage:
<<<
{text}
>>>"""

_MD = r"[ \t*_#>-]*"  # markdown decoration around the turn names
_DIALOGUE_RE = re.compile(rf"^{_MD}User{_MD}:{_MD}(?P<user>.+?)\s*^{_MD}Assistant{_MD}:{_MD}"
                          r"(?P<assistant>.+?)\s*\Z", re.DOTALL | re.MULTILINE | re.IGNORECASE)


def _topic(label: SafetyLabel, taxonomy: Taxonomy) -> str:
    name = category_name(label.category, taxonomy)
    return name if label.category is None else f"{name} ({label.category})"


class _EndpointWriter:
    """Shared plumbing: the client, taxonomy and text limit (picklable through the client)."""

    kind = ""

    def __init__(self, model: str, base_url: str = "http://localhost:8000/v1",
                 max_chars: int = 8000, taxonomy: Taxonomy = DEFAULT_TAXONOMY,
                 **endpoint: Any) -> None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"{self.kind} option 'max_chars' must be an integer >= 1, "
                             f"got {max_chars!r}")
        self.taxonomy = taxonomy
        self.max_chars = max_chars
        self.client = EndpointClient(EndpointConfig.from_options(
            {**endpoint, "model": model, "base_url": base_url}, max_tokens=1024))

    def _ask(self, system: str, prompt: str, items: Sequence[tuple[str, SafetyLabel]]) -> list[str]:
        conversations = [[{"role": "system", "content": system},
                          {"role": "user", "content": prompt.format(
                              topic=_topic(label, self.taxonomy), text=text[: self.max_chars])}]
                         for text, label in items]
        return self.client.complete_many(conversations)

    def describe(self) -> dict[str, Any]:
        c = self.client.config
        return {"name": self.kind, "model": c.model, "base_url": c.base_url,
                "temperature": c.temperature, "max_tokens": c.max_tokens,
                "max_chars": self.max_chars, "cache_dir": c.cache_dir,
                "taxonomy": self.taxonomy.name}


class EndpointRewriter(_EndpointWriter):
    """SafeWeb-style rewrites by a served LLM (the ``Rewriter`` protocol of ``rewrite.py``).
    An empty reply is a ``ValueError`` quoting the passage, unless ``on_empty`` is
    ``"template"``: then ``fallback`` (the template rewriter, which ``Rewrite`` passes) rewrites
    that passage."""

    kind = "endpoint-rewriter"

    def __init__(self, model: str, on_empty: str = "error", fallback: Any = None,
                 **options: Any) -> None:
        if on_empty not in ("error", "template"):
            raise ValueError(f"{self.kind} option 'on_empty' must be 'error' or 'template', "
                             f"got {on_empty!r}")
        if on_empty == "template" and fallback is None:
            raise ValueError(f"{self.kind}: on_empty='template' needs the template rewriter "
                             "as fallback (Rewrite passes it)")
        super().__init__(model, **options)
        self.on_empty = on_empty
        self.fallback = fallback

    def rewrite(self, segment_text: str, label: SafetyLabel) -> str:
        return self.rewrite_many([(segment_text, label)])[0]

    def rewrite_many(self, items: Sequence[tuple[str, SafetyLabel]]) -> list[str]:
        replies = [r.strip() for r in self._ask(REWRITE_SYSTEM, REWRITE_PROMPT, items)]
        for i, ((text, label), reply) in enumerate(zip(items, replies)):
            if reply:
                continue
            if self.on_empty == "error":
                raise ValueError(f"{self.kind}: the endpoint returned an empty rewrite for "
                                 f"{text[:80]!r} (set option 'on_empty' to 'template' to use "
                                 "the template rewrite instead)")
            replies[i] = self.fallback.rewrite(text, label)
        return replies

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "on_empty": self.on_empty}


class EndpointDialogueWriter(_EndpointWriter):
    """RefuseWeb-style request -> refusal dialogues by a served LLM, for ``Refusal``.

    Every dialogue is normalised to ``User: <request>\\nAssistant: <refusal>``, the template's
    form. A reply without both turns is a ``ValueError`` quoting it, unless ``on_unparseable``
    is ``"template"``: then the template dialogue ``fallback`` (set by ``Refusal``) is used.
    """

    kind = "endpoint-dialogue"

    def __init__(self, model: str, on_unparseable: str = "error", **options: Any) -> None:
        if on_unparseable not in ("error", "template"):
            raise ValueError(f"{self.kind} option 'on_unparseable' must be 'error' or "
                             f"'template', got {on_unparseable!r}")
        super().__init__(model, **options)
        self.on_unparseable = on_unparseable

    @staticmethod
    def parse(reply: str) -> Optional[tuple[str, str]]:
        """``(request, refusal)`` from a ``User: ...`` / ``Assistant: ...`` reply, else None."""
        match = _DIALOGUE_RE.search(reply)
        if match is None:
            return None
        user, assistant = (" ".join(match.group(g).split()) for g in ("user", "assistant"))
        return (user, assistant) if user and assistant else None

    def dialogue_many(self, items: Sequence[tuple[str, SafetyLabel]],
                      fallback: Optional[Sequence[str]] = None) -> list[str]:
        out = []
        for i, reply in enumerate(self._ask(DIALOGUE_SYSTEM, DIALOGUE_PROMPT, items)):
            turns = self.parse(reply)
            if turns is not None:
                out.append(f"User: {turns[0]}\nAssistant: {turns[1]}")
            elif self.on_unparseable == "template" and fallback is not None:
                out.append(fallback[i])
            else:
                raise ValueError(f"{self.kind}: reply {reply[:200]!r} is not 'User: ...' then "
                                 "'Assistant: ...' (option 'on_unparseable': 'template' uses "
                                 "the template dialogue instead)")
        return out

    def dialogue(self, segment_text: str, label: SafetyLabel) -> str:
        return self.dialogue_many([(segment_text, label)])[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "on_unparseable": self.on_unparseable}
