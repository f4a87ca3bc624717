"""One choice of one request as it is generated: its text so far, stop strings, logprobs, and
the pieces a stream sends.

The engine's thread calls :meth:`Choice.on_token` for every new token. The choice decodes the
text so far (together with the prompt, so a character split over two byte-level tokens comes out
whole), ends the answer at the first stop string, and hands the text that is now certain to
``emit`` for streaming: never the start of a possible stop string, never half a character.
With ``logprobs`` it records each token's log-probability (logprobs.py writes them out); the
end-of-document token that ends an answer is recorded too (not in the text), as OpenAI's API
does, so a harness asking for one token after an echoed prompt always gets one entry after it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from megatron_srp.inference.results import GenerationResult
from megatron_srp.inference.sample import _decode_continuation
from megatron_srp.serving.logprobs import (TokenLogprob, chat_logprobs, completion_logprobs,
                                           record)
from megatron_srp.tokenizer import SRPTokenizer

#: How a decoding ``finish`` is reported as OpenAI's ``finish_reason``.
FINISH_REASON = {"eod": "stop", "length": "length", "tag": "content_filter",
                 "reflection": "content_filter", "unchecked": "content_filter"}


class Choice:
    """The state of one choice while it is generated, and its final answer."""

    def __init__(self, tokenizer: SRPTokenizer, prompt_ids: list[int], index: int,
                 stops: list[str], logprobs: Optional[int] = None,
                 emit: Optional[Callable[[int, str], None]] = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.index = index
        self.stops = stops
        self.logprobs = logprobs
        self.emit = emit
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already emitted
        self.hit_stop = False
        self.entries: list[TokenLogprob] = []  # one per token of ids (with logprobs)
        self.end_entry: Optional[TokenLogprob] = None  # the end-of-document token, if drawn
        self.echo: Optional[list[TokenLogprob]] = None  # the prompt's, with echo

    def on_token(self, token: int, logits: torch.Tensor) -> bool:
        """Record one new token; True ends the answer (a stop string was written, or the
        end-of-document token was drawn)."""
        if token in self.tokenizer.stop_ids:
            if self.logprobs is not None:
                self.end_entry = record(logits, token, self.logprobs)
            return True
        self.ids.append(token)
        if self.logprobs is not None:
            self.entries.append(record(logits, token, self.logprobs))
        self.text = _decode_continuation(self.tokenizer, self.prompt_ids, self.ids)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.hit_stop = self.text[:cut], True
        self._emit(final=self.hit_stop)
        return self.hit_stop

    def _first_stop(self) -> Optional[int]:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _emit(self, final: bool) -> None:
        if self.emit is None:
            return
        end = len(self.text)
        if not final:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self.sent, end - hold)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1  # half a character: wait for the rest
        if end > self.sent:
            self.emit(self.index, self.text[self.sent:end])
            self.sent = end

    # ------------------------------------------------------------------ the final answer
    def finish(self, result: GenerationResult) -> dict[str, Any]:
        """The choice's fields once decoding is done (text, finish_reason, srp extension).

        A short-circuited answer (the harmfulness tag, an Unsafe reflection) is the fixed safe
        completion; a stream has by then sent what came before it, and its last chunk says
        ``content_filter``. Methods that do not report tokens as they go (beam search, guarded
        decoding) have their stop strings applied to the finished text."""
        observed = bool(self.ids) or self.hit_stop
        if result.short_circuited or not observed:
            self.text = result.text
        if not observed and not result.short_circuited:
            self.ids = list(result.ids)
            cut = self._first_stop()
            if cut is not None:
                self.text, self.hit_stop = self.text[:cut], True
        reason = "stop" if self.hit_stop else FINISH_REASON.get(result.finish, "stop")
        srp = {"finish": result.finish, "short_circuited": result.short_circuited,
               "category": result.category, "reflections": result.reflections}
        if not result.short_circuited or self.sent == 0:
            self._emit(final=True)
        return {"text": self.text, "finish_reason": reason, "srp": srp,
                "completion_tokens": len(result.ids)}

    def kept_entries(self) -> list[TokenLogprob]:
        """The log-probability entries of the tokens kept in the text (those that wrote a stop
        string are dropped), then the end-of-document token that ended the answer, if any."""
        offsets, offset = [], 0
        for e in self.entries:
            offsets.append(offset)
            offset += len(self.tokenizer.detokenize([e.token]))
        keep = len(self.entries)
        if self.hit_stop:  # drop the tokens that wrote (part of) the stop string
            while keep and offsets[keep - 1] + len(
                    self.tokenizer.detokenize([self.entries[keep - 1].token])) > len(self.text):
                keep -= 1
        kept = self.entries[:keep]
        if self.end_entry is not None and not self.hit_stop:
            kept.append(self.end_entry)
        return kept

    def logprobs_body(self, chat: bool = False) -> Optional[dict[str, Any]]:
        """OpenAI's ``logprobs`` object for the choice: the legacy completions format (after the
        echoed prompt's, with echo), or the chat format."""
        if self.logprobs is None:
            return None
        kept = self.kept_entries()
        if chat:
            return chat_logprobs(self.tokenizer, kept)
        if self.echo is None:
            return completion_logprobs(self.tokenizer, kept)
        prompt = completion_logprobs(self.tokenizer, self.echo)
        start = len(self.tokenizer.detokenize(self.prompt_ids))
        answer = completion_logprobs(self.tokenizer, kept, offset=start)
        return {k: prompt[k] + answer[k] for k in prompt}
