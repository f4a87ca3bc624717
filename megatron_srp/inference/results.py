"""What every decoding method returns, and the small steps they share (the context a cache can
hold, the harmfulness tag's id, turning new ids into a result). Apart from generation.py, which
dispatches to the methods, so that the methods (beam.py, guarded.py) need not import it back."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from megatron_srp.inference.sample import _decode_continuation
from megatron_srp.taxonomy import UNSAFE_TAG
from megatron_srp.tokenizer import SRPTokenizer

#: What a short-circuited answer says instead of the model's text.
SAFE_COMPLETION = "I can't help with that."

#: Why a reflection-guarded answer was refused: the model wrote ``Unsafe`` (the monitor
#: itself), a label that is neither Safe nor Unsafe (fail-closed), or a reflection that was
#: due but had no room in the row's context window (fail-closed).
REFUSAL_CAUSES = ("unsafe", "malformed", "unread")


@dataclass
class GenerationResult:
    """One prompt's answer and how it ended.

    ``finish``: ``"eod"`` (end-of-document token), ``"length"`` (``max_new_tokens``),
    ``"tag"`` (the model produced the harmfulness tag: the answer was short-circuited to the
    fixed safe completion) or ``"reflection"`` (reflection-guarded decoding read Unsafe and
    refused). ``ids`` are the new tokens the model produced (without a terminating token);
    ``text`` is what a user sees.

    Reflection-guarded answers also say why they were refused (``refusal_cause``, one of
    :data:`REFUSAL_CAUSES`) and, when the row's context window could not hold
    ``max_new_tokens`` plus its reflections, the smaller budget it was given
    (``answer_budget``, set before decoding).
    """

    ids: list[int]
    text: str
    finish: str
    short_circuited: bool = False
    category: Optional[str] = None
    reflections: list[dict[str, Any]] = field(default_factory=list)
    score: Optional[float] = None
    refusal_cause: Optional[str] = None
    answer_budget: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_prompts(tokenizer: SRPTokenizer, prompt_ids: Sequence[Sequence[int]],
                    max_new_tokens: int, window: int) -> list[list[int]]:
    """Each prompt as the context a cache can hold: an empty prompt starts a document (the
    end-of-document token); a prompt longer than ``window - max_new_tokens`` keeps its end."""
    if max_new_tokens >= window:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the model's context "
                         f"length ({window})")
    keep = window - max_new_tokens
    return [list(p)[-keep:] if len(p) else [tokenizer.eod] for p in prompt_ids]


def tag_id(tokenizer: SRPTokenizer) -> int:
    """The id of ``<potentially_unsafe_content>`` (every project tokenizer has it)."""
    ids = tokenizer.tokenize(UNSAFE_TAG)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer does not have {UNSAFE_TAG} as one special token")
    return ids[0]


def finish_result(tokenizer: SRPTokenizer, prompt: list[int], ids: list[int],
                  stop: Optional[int], tag: int, score: Optional[float] = None) -> GenerationResult:
    """A result from new ids and the token that stopped them; the harmfulness tag
    short-circuits the answer to :data:`SAFE_COMPLETION`."""
    if stop == tag:
        return GenerationResult(ids=ids, text=SAFE_COMPLETION, finish="tag",
                                short_circuited=True, score=score)
    finish = "eod" if stop is not None else "length"
    return GenerationResult(ids=ids, text=_decode_continuation(tokenizer, prompt, ids),
                            finish=finish, score=score)
