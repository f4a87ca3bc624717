"""The OpenAI-compatible request bodies, their checks, and the error body every 4xx carries.

Requests are pydantic models, so a wrong type or a value out of range is found before anything
is queued, and the error names the field (``param``) the way OpenAI's API does:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": null}}

Fields this server does not know are accepted and ignored (clients such as lm-eval send their
own), except those whose meaning it cannot honour (penalties other than 0, ``echo`` with
``stream``), which are refused by name. ``echo`` returns the prompt before the answer, with the
prompt tokens' log-probabilities when ``logprobs`` is set (and then ``max_tokens`` may be 0);
chat answers carry log-probabilities with ``logprobs: true`` (``top_logprobs``: 0-20
alternatives). The project's decoding modes are extensions: ``"decoding": "safebeam"`` or
``"guarded"`` (``extra_body`` in the ``openai`` client); their reflections come back beside the
text, in each choice's ``srp`` object.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

DECODING = ("sample", "beam", "safebeam", "guarded")


class APIError(Exception):
    """An error the client caused (4xx) or the server could not help (5xx), OpenAI-shaped."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: Optional[str] = None, type: str = "invalid_request_error",
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow", strict=False)

    model: str
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension (vLLM's): 0 or -1 = off
    n: int = Field(1, ge=1, le=16)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # extensions: the project's decoding modes
    decoding: Literal["sample", "beam", "safebeam", "guarded"] = "sample"
    num_beams: int = Field(4, ge=1, le=16)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop sequences, none of them empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported by this server (use 0)")
        return value

    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _has_a_user_turn(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        # The answer is always a new assistant turn after the last message (after an
        # assistant message too: a Llama Guard style judge reads the whole exchange).
        if not any(m.role == "user" for m in value):
            raise ValueError("at least one message must have role 'user'")
        return value


def param_of(loc: tuple) -> Optional[str]:
    """The field a pydantic error location names, as OpenAI writes it (``messages.0.role``)."""
    parts = [str(p) for p in loc if p not in ("body",)]
    # drop pydantic's union branch names ("str", "list[int]") so the field itself is named
    parts = [p for p in parts if not p.startswith(("list[", "str", "int"))]
    return ".".join(parts) or None
