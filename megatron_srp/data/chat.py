"""Chat-formatted supervised finetuning data: the loss on the answer only.

A record is one exchange, ``{"prompt": ..., "response": ...}`` (key names configurable, e.g.
``question`` / ``answer`` for GSM8K), or ``{"messages": [{"role": "user", ...},
{"role": "assistant", ...}, ...]}`` where every assistant turn is trained on. It is rendered as

    <|endoftext|>User: {prompt}\\nAssistant: {response}<|endoftext|>

and tokenised with the run's tokenizer, so reflection markers and the harmfulness tag in a
response keep their special-token ids. A model with its own chat format (an import; the
tokenizer's ``chat``, chat_template.py) is written in that format instead, system prompt and
all. The loss covers the answer tokens and the token that closes the turn (the model learns to
stop), never the prompt or the template; ``loss_on`` narrows it to the answer's text
(``answer``), to its reflections and the closing token after one (``reflection``: the model
learns to judge its answers without its answers changing), or keeps both (``both``).
Samples have the run's sequence length: shorter ones are padded (mask 0); longer ones are cut,
and counted, never silently. Items are dicts of ``tokens, labels, loss_mask, position_ids``,
what the training loop's ``collate`` stacks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_srp.chat_template import ANSWER, REFLECTION, encode_conversation, mark_reflections

USER, ASSISTANT = "User: ", "\nAssistant: "
LOSS_ON = {"answer": (ANSWER,), "reflection": (REFLECTION,), "both": (ANSWER, REFLECTION)}


class ChatDataError(ValueError):
    """A chat record that cannot be used, named by file and line."""


@dataclass
class ChatFormat:
    """Which record keys hold the prompt and the response."""

    prompt_key: str = "prompt"
    response_key: str = "response"


def _turns(record: dict, fmt: ChatFormat, where: str) -> list[tuple[str, str]]:
    """``[(role, text), ...]`` of a record, roles ``user`` / ``assistant``."""
    if "messages" in record:
        turns = []
        for m in record["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ChatDataError(f"{where}: each message needs role system/user/assistant and "
                                    f"string content, got {str(m)[:80]!r}")
            turns.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            raise ChatDataError(f"{where}: no assistant message to train on")
        return turns
    for key in (fmt.prompt_key, fmt.response_key):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ChatDataError(f"{where}: missing or empty {key!r} (keys: "
                                f"{', '.join(sorted(record)) or 'none'})")
    return [("user", record[fmt.prompt_key]), ("assistant", record[fmt.response_key])]


def encode_chat(turns: Sequence[tuple[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """``(ids, kinds)``: the rendered exchange, and per token 0 (no loss), ``ANSWER`` or
    ``REFLECTION`` (chat_template.py); :func:`loss_mask` turns kinds into a mask."""
    if getattr(tokenizer, "chat", None) is not None:
        ids, kinds = encode_conversation(tokenizer.chat, turns, tokenizer.tokenize,
                                         tokenizer.end_of_turn_id)
    else:
        ids, kinds = _encode_own_format(turns, tokenizer)
    return ids, mark_reflections(ids, kinds, tokenizer.reflect_open_id,
                                 tokenizer.reflect_close_id, (tokenizer.end_of_turn_id,))


def loss_mask(kinds: Sequence[int], loss_on: str = "both") -> list[int]:
    """1 where ``loss_on`` (answer, reflection or both) trains, else 0."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    return [1 if k in LOSS_ON[loss_on] else 0 for k in kinds]


def _encode_own_format(turns: Sequence[tuple[str, str]], tokenizer
                       ) -> tuple[list[int], list[int]]:
    ids, mask = [tokenizer.eod], [0]
    for role, text in turns:
        if role == "system":
            raise ChatDataError("the project's chat format has user and assistant turns only; "
                                "a system message needs a model with its own chat format")
        if role == "user":
            piece = tokenizer.tokenize(USER + text)
            ids += piece
            mask += [0] * len(piece)
        else:
            head = tokenizer.tokenize(ASSISTANT)
            body = tokenizer.tokenize(text)
            ids += head + body
            mask += [0] * len(head) + [1] * len(body)
    ids.append(tokenizer.eod)
    mask.append(1)
    return ids, mask


def read_chat_jsonl(path: str | Path, fmt: Optional[ChatFormat] = None
                    ) -> list[list[tuple[str, str]]]:
    """Every record's turns; a bad line is a ChatDataError naming ``file:line``."""
    fmt = fmt or ChatFormat()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ChatDataError(f"{where}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ChatDataError(f"{where}: expected a JSON object")
            out.append(_turns(record, fmt, where))
    if not out:
        raise ChatDataError(f"{path}: no records")
    return out


class SFTDataset:
    """Fixed-length samples with the loss on the answers, their reflections or both
    (``loss_on``; see the module docstring)."""

    def __init__(self, conversations: Sequence[Sequence[tuple[str, str]]], tokenizer,
                 seq_length: int, loss_on: str = "both") -> None:
        self.seq_length = seq_length
        self.loss_on = loss_on
        self.pad = tokenizer.pad
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = 0
        self.without_answer = 0
        for turns in conversations:
            ids, kinds = encode_chat(turns, tokenizer)
            mask = loss_mask(kinds, loss_on)
            if len(ids) > seq_length + 1:
                self.truncated += 1
                ids, mask = ids[:seq_length + 1], mask[:seq_length + 1]
            if sum(mask[1:]) == 0:  # nothing to learn from (cut off, or no reflection)
                self.without_answer += 1
                continue
            self.samples.append((np.array(ids, dtype=np.int64), np.array(mask, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, mask = self.samples[i]
        n = self.seq_length
        tokens = np.full(n, self.pad, dtype=np.int64)
        labels = np.full(n, self.pad, dtype=np.int64)
        loss_mask = np.zeros(n, dtype=np.float32)
        k = len(ids) - 1
        tokens[:k] = ids[:-1]
        labels[:k] = ids[1:]
        loss_mask[:k] = mask[1:]  # position t predicts token t+1: its mask is that token's
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": np.arange(n, dtype=np.int64)}

    def stats(self) -> dict[str, int]:
        return {"samples": len(self), "truncated": self.truncated,
                "dropped_without_answer": self.without_answer}
