"""What one request may cost, so that one client cannot hold the model (or the memory) for
everyone: the body's size, its prompt tokens, the tokens it asks to generate, and how long it
may wait for the model before the server gives up on it.

Each limit refused is a 4xx (the queue wait a 503) with an OpenAI-style body whose ``code`` is
the limit's name and whose message names the option that sets it, so a client or an operator
sees at once which limit was hit. The counts by cause go to ``/metrics``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_srp.serving.protocol import APIError

#: the defaults (docs/serving.md); None for the token limits: a multiple of the context
MAX_BODY_BYTES = 1 << 20
MAX_QUEUE_WAIT_S = 60.0
PROMPT_CONTEXTS = 16  # --max-prompt-tokens default: 16 contexts' worth per request
N_TOKENS_CONTEXTS = 8  # --max-n-tokens default: 8 contexts' worth per request


@dataclass
class Limits:
    """The limits of one server; ``None`` token limits resolve against the model's context
    (:meth:`resolve`). 0 switches a limit off."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_prompt_tokens: Optional[int] = None
    max_n_tokens: Optional[int] = None
    max_queue_wait_s: float = MAX_QUEUE_WAIT_S

    def __post_init__(self) -> None:
        for key in ("max_body_bytes", "max_prompt_tokens", "max_n_tokens", "max_queue_wait_s"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")

    def resolve(self, window: int) -> "Limits":
        """These limits with the token defaults filled in for a model of ``window`` tokens."""
        return Limits(self.max_body_bytes,
                      PROMPT_CONTEXTS * window if self.max_prompt_tokens is None
                      else self.max_prompt_tokens,
                      N_TOKENS_CONTEXTS * window if self.max_n_tokens is None
                      else self.max_n_tokens,
                      self.max_queue_wait_s)

    # ------------------------------------------------------------------ the checks
    def body_too_large(self, size: int) -> Optional[APIError]:
        if self.max_body_bytes and size > self.max_body_bytes:
            return APIError(413, f"The request body has more than {self.max_body_bytes} bytes "
                                 f"(--max-body-bytes)", None, code="max_body_bytes")
        return None

    def check_prompts(self, prompts: list[list[int]], field: str) -> None:
        total = sum(len(p) for p in prompts)
        if self.max_prompt_tokens and total > self.max_prompt_tokens:
            raise APIError(400, f"The request's prompts have {total} tokens; this server takes "
                                f"at most {self.max_prompt_tokens} per request "
                                f"(--max-prompt-tokens)", field, code="max_prompt_tokens")

    def check_generation(self, prompts: int, n: int, max_tokens: int) -> None:
        asked = prompts * n * max_tokens
        if self.max_n_tokens and asked > self.max_n_tokens:
            what = f"n ({n}) x max_tokens ({max_tokens})"
            if prompts > 1:
                what = f"{prompts} prompts x {what}"
            raise APIError(400, f"{what} = {asked} tokens to generate; this server takes at "
                                f"most {self.max_n_tokens} per request (--max-n-tokens)",
                           "max_tokens", code="max_n_tokens")

    def queue_wait_exceeded(self, retry_after_s: float) -> APIError:
        return APIError(503, f"The request waited {self.max_queue_wait_s:g} s for the model "
                             f"without starting (--max-queue-wait-s); retry later", None,
                        type="server_busy", code="max_queue_wait_s",
                        headers={"Retry-After": f"{retry_after_s:.0f}"})
