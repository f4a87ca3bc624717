"""A model's own chat format: its Jinja chat template, end-of-turn token and stop tokens.

Models trained here speak the project's format (``data/chat.py``: ``User: ...\\nAssistant:``).
An imported instruct model was tuned on its own format (SmolLM2: ChatML, ``<|im_start|>`` /
``<|im_end|>``), and asked in another one it answers badly. So an import records the model's
format (:func:`read_hf_chat`, from ``tokenizer_config.json`` / ``chat_template.jinja`` or GGUF
metadata) in the tokenizer's ``srp_tokenizer.json``, and every stage that formats a
conversation (finetuning data, the server's chat endpoint, the attack suite's ``model``
template, guarded decoding's stop tokens, the export) reads it from the tokenizer.

The template is rendered the way ``transformers``' ``apply_chat_template`` renders it (a
sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``), so the same messages
give the same text, and the tokens of a served prompt equal ``transformers``' token for token.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered, named by file or key."""


@dataclass(frozen=True)
class ChatSpec:
    """A model's chat format. ``end_of_turn``: the token that closes every turn (the loss
    covers it after an answer, so the model learns to stop); ``stop_tokens``: what ends
    generation besides the end-of-document token; ``generation``: the original's decoding
    defaults (``generation_config.json``: greedy unless it said ``do_sample``)."""

    template: str
    end_of_turn: str
    stop_tokens: tuple[str, ...] = ()
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    generation: dict = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop_tokens"] = list(self.stop_tokens)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "chat") -> "ChatSpec":
        try:
            return cls(template=data["template"], end_of_turn=data["end_of_turn"],
                       stop_tokens=tuple(data.get("stop_tokens") or ()),
                       bos_token=data.get("bos_token"), eos_token=data.get("eos_token"),
                       generation=dict(data.get("generation") or {}),
                       source=data.get("source", ""))
        except (KeyError, TypeError) as exc:
            raise ChatTemplateError(f"{where}: a chat record needs 'template' and "
                                    f"'end_of_turn' ({exc!r})") from exc

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The conversation as text, exactly as ``apply_chat_template(tokenize=False)``."""
        try:
            return _compiled(self.template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ChatTemplateError:
            raise
        except Exception as exc:  # jinja2 errors of every kind
            raise ChatTemplateError(f"chat template ({self.source or 'recorded'}) failed to "
                                    f"render: {exc}") from exc


    def around_request(self) -> tuple[str, str]:
        """The text before and after a lone user request, up to where the answer starts: how
        a model is asked in its own format (the system prompt its template adds included)."""
        marker = "\x00request\x00"
        text = self.render([{"role": "user", "content": marker}], add_generation_prompt=True)
        if text.count(marker) != 1:
            raise ChatTemplateError(f"chat template ({self.source}): a user message does not "
                                    f"appear exactly once in its rendering")
        before, after = text.split(marker)
        return before, after


def _raise(message: str):
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except Exception as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from exc


def _token_text(value: Any) -> Optional[str]:
    """``"<|im_end|>"`` or ``{"content": "<|im_end|>", ...}`` (older tokenizer configs)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def chat_spec(template: str, eos_token: Optional[str], bos_token: Optional[str] = None,
              generation: Optional[dict] = None, source: str = "") -> ChatSpec:
    """The spec of a template whose turns end in ``eos_token`` (ChatML's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``): that token ends every turn and stops generation."""
    if not eos_token:
        raise ChatTemplateError(f"{source}: a chat template without an eos_token: the turn's "
                                f"end (and where generation stops) is unknown")
    if eos_token not in template:
        raise ChatTemplateError(f"{source}: the eos_token {eos_token!r} does not appear in the "
                                f"chat template, so it cannot be the end of a turn")
    _compiled(template)
    return ChatSpec(template=template, end_of_turn=eos_token, stop_tokens=(eos_token,),
                    bos_token=bos_token, eos_token=eos_token, generation=dict(generation or {}),
                    source=source)


def generation_defaults(config: dict) -> dict:
    """The decoding defaults worth keeping from a ``generation_config.json``."""
    keys = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty")
    return {k: config[k] for k in keys if k in config}


def read_hf_chat(directory: str | Path) -> Optional[ChatSpec]:
    """The chat format of a Hugging Face model or tokenizer directory, or None when it has no
    chat template (a base model: it is asked in plain text or the project's format)."""
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(f"{config_path}: invalid JSON ({exc.msg}, line "
                                    f"{exc.lineno})") from exc
    template, source = config.get("chat_template"), f"{config_path}:chat_template"
    if (directory / TEMPLATE_FILE).is_file():
        template, source = (directory / TEMPLATE_FILE).read_text(encoding="utf-8"), \
            str(directory / TEMPLATE_FILE)
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template:
        return None
    if not isinstance(template, str):
        raise ChatTemplateError(f"{source}: expected a string, got {type(template).__name__}")
    generation = {}
    gen_path = directory / GENERATION_CONFIG
    if gen_path.is_file():
        generation = generation_defaults(json.loads(gen_path.read_text(encoding="utf-8")))
    return chat_spec(template, _token_text(config.get("eos_token")),
                     _token_text(config.get("bos_token")), generation, source)


# ------------------------------------------------------------------------ conversations -> ids
ANSWER, REFLECTION = 1, 2  # loss-mask kinds of a token (0: no loss)


def encode_conversation(spec: ChatSpec, turns: Sequence[tuple[str, str]],
                        tokenize: Callable[[str], list[int]], end_of_turn_id: int
                        ) -> tuple[list[int], list[int]]:
    """``(ids, kinds)`` of a conversation in ``spec``'s format: kind :data:`ANSWER` on each
    assistant turn's content and the end-of-turn token after it, 0 elsewhere (system prompt,
    user turns, role headers). Reflections inside an answer are marked by the caller.

    Each assistant turn is located by rendering the conversation up to it with the generation
    prompt, then with the turn: the text between is the turn's content plus its closing."""
    messages: list[dict] = []
    ids: list[int] = []
    kinds: list[int] = []
    done = ""

    def put(text: str, kind: int) -> None:
        piece = tokenize(text) if text else []
        ids.extend(piece)
        kinds.extend([kind] * len(piece))

    for role, text in turns:
        if role != "assistant":
            messages.append({"role": role, "content": text})
            continue
        head = spec.render(messages, add_generation_prompt=True)
        messages.append({"role": role, "content": text})
        full = spec.render(messages, add_generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head + text):
            raise ChatTemplateError(f"chat template ({spec.source}): an assistant turn is not "
                                    f"rendered after its generation prompt, so its tokens "
                                    f"cannot be located for the loss mask")
        put(head[len(done):], 0)
        put(text, ANSWER)
        closing = full[len(head) + len(text):]
        cut = closing.find(spec.end_of_turn)
        if cut < 0:
            raise ChatTemplateError(f"chat template ({spec.source}): no {spec.end_of_turn!r} "
                                    f"after an assistant turn")
        put(closing[:cut], 0)
        ids.append(end_of_turn_id)
        kinds.append(ANSWER)
        put(closing[cut + len(spec.end_of_turn):], 0)
        done = full
    put(spec.render(messages, add_generation_prompt=False)[len(done):], 0)
    return ids, kinds


def mark_reflections(ids: Sequence[int], kinds: list[int], open_id: int, close_id: int,
                     end_ids: Sequence[int] = ()) -> list[int]:
    """Kind :data:`REFLECTION` on each reflection (opener to closer) of an answer, and on the
    end-of-turn token right after one: what the model must say to close an answer with its
    verdict."""
    inside = False
    for i, tok in enumerate(ids):
        if not kinds[i]:
            inside = False
            continue
        if tok == open_id:
            inside = True
        if inside or (tok in end_ids and i and ids[i - 1] == close_id):
            kinds[i] = REFLECTION
        if tok == close_id:
            inside = False
    return kinds
