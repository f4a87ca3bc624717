"""The HTTP side of the server: FastAPI routes for OpenAI's completions, chat completions and
models endpoints, plus ``/health``; streaming as server-sent events.

Every request is checked (protocol.py) and turned into engine jobs, one per choice. A bad
request gets a 4xx with an OpenAI-style error body naming the field, a full queue a 429 with
``Retry-After``, a failed batch a 500; none of them stops the server.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from megatron_srp.data.chat import ASSISTANT, encode_chat
from megatron_srp.evaluation.attacks import decoding_config
from megatron_srp.inference.sample import GenerationConfig
from megatron_srp.serving.choices import Choice
from megatron_srp.serving.engine import Engine, Job, QueueFull, new_seed
from megatron_srp.serving.protocol import (APIError, ChatRequest, CompletionRequest, _Sampling,
                                           error_body, param_of)


def chat_prompt_ids(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    """The prompt a chat model is asked with. A model with its own chat format (an import) gets
    it, rendered as ``apply_chat_template(add_generation_prompt=True)`` would. A checkpoint
    trained here gets its finetuning format (data/chat.py) up to the assistant's turn; there a
    system message opens the first user turn."""
    if getattr(tokenizer, "chat", None) is not None:
        text = tokenizer.chat.render([{"role": r, "content": t} for r, t in messages],
                                     add_generation_prompt=True)
        return tokenizer.tokenize(text)
    turns: list[tuple[str, str]] = []
    system = [text for role, text in messages if role == "system"]
    for role, text in messages:
        if role == "system":
            continue
        if role == "user" and not turns and system:
            text = "\n\n".join(system + [text])
        turns.append((role, text))
    ids, _ = encode_chat(turns, tokenizer)
    return ids[:-1] + tokenizer.tokenize(ASSISTANT)


class Server:
    """What the routes need: the engine, the served name, and the request -> jobs logic."""

    def __init__(self, engine: Engine, model_name: str, guard_segment_tokens: int = 256) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.guard_segment_tokens = guard_segment_tokens

    # ------------------------------------------------------------------ request -> jobs
    def method(self, req: _Sampling, max_tokens: int, seed: int):
        if req.decoding == "sample":
            return GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature,
                                    top_k=max(req.top_k, 0), top_p=req.top_p, seed=seed)
        method = decoding_config(req.decoding, max_tokens, seed, num_beams=req.num_beams,
                                 segment_tokens=self.guard_segment_tokens)
        if req.decoding == "guarded":
            sampling = GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature,
                                        top_k=max(req.top_k, 0), top_p=req.top_p, seed=seed)
            method = replace(method, sampling=sampling)
        return method

    def check(self, req: _Sampling, prompts: list[list[int]], max_tokens: Optional[int],
              prompt_field: str) -> int:
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", code="model_not_found")
        window = self.engine.window
        if max_tokens is None:  # chat without a limit: the rest of the context
            max_tokens = max(1, window - max(len(p) for p in prompts))
        if isinstance(max_tokens, bool) or max_tokens < 1 or max_tokens >= window:
            raise APIError(400, f"max_tokens must be an integer in [1, {window - 1}] (this "
                                f"model's context is {window} tokens), got {max_tokens}",
                           "max_tokens")
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens; the "
                                f"prompt has {longest} and max_tokens asks for {max_tokens} more",
                           prompt_field, code="context_length_exceeded")
        return max_tokens

    def choices(self, req: _Sampling, prompts: list[list[int]], max_tokens: int,
                logprobs: Optional[int], emit=None) -> tuple[list[Choice], list[Job]]:
        seed = req.seed if req.seed is not None else new_seed()
        method = self.method(req, max_tokens, seed)
        choices, jobs = [], []
        for p, prompt in enumerate(prompts):
            for c in range(req.n):
                choice = Choice(self.tokenizer, prompt, len(choices), req.stops(), logprobs, emit)
                # Followed token by token only when something needs it (streaming, stop
                # strings, logprobs); otherwise the text is decoded once at the end.
                follow = isinstance(method, GenerationConfig) and (
                    emit is not None or req.stops() or logprobs is not None)
                jobs.append(Job(prompt, method, seed=seed, choice=c,
                                on_token=choice.on_token if follow else None))
                choices.append(choice)
        return choices, jobs

    def submit(self, jobs: list[Job]):
        try:
            return [asyncio.wrap_future(f) for f in self.engine.submit(jobs)]
        except QueueFull as exc:
            raise APIError(429, str(exc), type="server_busy", code="queue_full",
                           headers={"Retry-After": f"{exc.retry_after_s:.0f}"}) from None


def _usage(prompts: list[list[int]], n: int, finished: list[dict]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts) * n
    completion = sum(f["completion_tokens"] for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _gather(futures) -> list:
    try:
        return list(await asyncio.gather(*futures))
    except Exception as exc:
        raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                       type="server_error") from exc


def build_app(server: Server) -> FastAPI:
    """The FastAPI application serving ``server``."""
    app = FastAPI(title="megatron-srp", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"The body is not valid JSON: {first.get('msg')}"),
                                status_code=400)
        param = param_of(tuple(first.get("loc", ())))
        message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, param), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_name, **server.engine.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.created,
                                            "owned_by": "megatron-srp"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Union[JSONResponse, StreamingResponse]:
        prompts = [server.tokenizer.tokenize(p) if isinstance(p, str) else list(p)
                   for p in req.prompts()]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        vocab = server.tokenizer.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        max_tokens = server.check(req, prompts, req.max_tokens, "prompt")
        return await _respond(server, req, prompts, max_tokens, req.logprobs, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Union[JSONResponse, StreamingResponse]:
        prompt = chat_prompt_ids(server.tokenizer, [(m.role, m.content) for m in req.messages])
        limit = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        max_tokens = server.check(req, [prompt], limit, "messages")
        return await _respond(server, req, [prompt], max_tokens, None, chat=True)

    return app


async def _respond(server: Server, req: _Sampling, prompts: list[list[int]], max_tokens: int,
                   logprobs: Optional[int], chat: bool) -> Union[JSONResponse, StreamingResponse]:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": server.model_name}
    if req.stream:
        return StreamingResponse(_stream(server, req, prompts, max_tokens, logprobs, chat, head),
                                 media_type="text/event-stream")
    choices, jobs = server.choices(req, prompts, max_tokens, logprobs)
    results = await _gather(server.submit(jobs))
    finished = [c.finish(r) for c, r in zip(choices, results)]
    body_choices = []
    for c, f in zip(choices, finished):
        item: dict[str, Any] = {"index": c.index, "finish_reason": f["finish_reason"],
                                "srp": f["srp"]}
        if chat:
            item["message"] = {"role": "assistant", "content": f["text"]}
        else:
            item["text"], item["logprobs"] = f["text"], c.logprobs_body()
        body_choices.append(item)
    return JSONResponse({**head, "choices": body_choices,
                         "usage": _usage(prompts, req.n, finished)})


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(server: Server, req: _Sampling, prompts: list[list[int]], max_tokens: int,
                  logprobs: Optional[int], chat: bool, head: dict) -> AsyncIterator[str]:
    """Chunks as tokens are drawn; the last chunk of each choice carries its finish_reason.

    Pieces arrive from the engine's thread through ``call_soon_threadsafe``, which runs them in
    order and before the done-callback of the same choice's future, so a choice's text always
    precedes its last chunk."""
    loop = asyncio.get_running_loop()
    pieces: list[tuple[int, str]] = []
    arrived = asyncio.Event()

    def add(item: tuple[int, str]) -> None:
        pieces.append(item)
        arrived.set()

    def emit(index: int, text: str) -> None:
        if threading.get_ident() == loop_thread:
            add((index, text))
        else:
            loop.call_soon_threadsafe(add, (index, text))

    loop_thread = threading.get_ident()
    choices, jobs = server.choices(req, prompts, max_tokens, logprobs, emit)
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: Optional[str], reason: Optional[str] = None,
              extra: Optional[dict] = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            item: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            item = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [{**item, **(extra or {})}]})

    def drain() -> list[str]:
        out = [chunk(i, t) for i, t in pieces]
        pieces.clear()
        arrived.clear()
        return out

    try:
        futures = server.submit(jobs)
    except APIError as exc:
        yield _sse(exc.body())
        return
    if chat:
        for c in choices:
            yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant",
                                                                         "content": ""},
                                             "finish_reason": None}]})
    waiting = {asyncio.ensure_future(f): c for f, c in zip(futures, choices)}
    signal = asyncio.ensure_future(arrived.wait())
    while waiting:
        done, _ = await asyncio.wait([signal, *waiting], return_when=asyncio.FIRST_COMPLETED)
        for text in drain():
            yield text
        if signal.done():
            signal = asyncio.ensure_future(arrived.wait())
        for fut in [f for f in done if f in waiting]:
            choice = waiting.pop(fut)
            try:
                finished = choice.finish(fut.result())
            except Exception as exc:  # the batch failed: say so in the stream
                yield _sse(error_body(f"generation failed: {exc}", type="server_error"))
                continue
            for text in drain():
                yield text
            yield chunk(choice.index, None, finished["finish_reason"], {"srp": finished["srp"]})
    signal.cancel()
    yield "data: [DONE]\n\n"
