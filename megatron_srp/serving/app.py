"""The HTTP side of the server: FastAPI routes for OpenAI's completions, chat completions and
models endpoints, plus ``/health`` and ``/metrics``; streaming as server-sent events.

Every request passes the gate (gate.py: draining, API key, body size), is checked
(protocol.py, limits.py) and turned into engine jobs, one per choice (and one per prompt scored
for ``echo``). A bad request gets a 4xx with an OpenAI-style error body naming the field or the
limit, a full queue a 429 and a request that waited too long a 503, both with ``Retry-After``;
a failed batch a 500; none of them stops the server.
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
from fastapi.responses import JSONResponse, Response, StreamingResponse

from megatron_srp.data.chat import ASSISTANT, encode_chat
from megatron_srp.evaluation.attacks import decoding_config
from megatron_srp.inference.sample import GenerationConfig
from megatron_srp.serving.choices import Choice
from megatron_srp.serving.engine import Engine, Job, QueueFull, new_seed
from megatron_srp.serving.gate import DrainState, Gate
from megatron_srp.serving.limits import Limits
from megatron_srp.serving.logprobs import PromptScore
from megatron_srp.serving.metrics import Metrics
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

    def __init__(self, engine: Engine, model_name: str, guard_segment_tokens: int = 256,
                 limits: Optional[Limits] = None, api_key: Optional[str] = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.guard_segment_tokens = guard_segment_tokens
        self.limits = (limits or Limits()).resolve(engine.window)
        self.api_key = api_key
        self.drain = DrainState()
        self.metrics = Metrics(model_name)
        self.metrics.watch_queue(lambda: engine.waiting)
        engine.on_batch = self.metrics.batch_size.observe

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
              prompt_field: str, echo: bool = False) -> int:
        """The request's ``max_tokens`` (0 only with ``echo``), checked against the context
        and the limits."""
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", code="model_not_found")
        window = self.engine.window
        self.limits.check_prompts(prompts, prompt_field)
        if max_tokens is None:  # chat without a limit: the rest of the context
            max_tokens = max(1, window - max(len(p) for p in prompts))
        least = 0 if echo else 1
        if isinstance(max_tokens, bool) or max_tokens < least or max_tokens >= window:
            raise APIError(400, f"max_tokens must be an integer in [{least}, {window - 1}] "
                                f"(this model's context is {window} tokens"
                                f"{'' if echo else '; 0 only with echo'}), got {max_tokens}",
                           "max_tokens")
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens; the "
                                f"prompt has {longest} and max_tokens asks for {max_tokens} more",
                           prompt_field, code="context_length_exceeded")
        self.limits.check_generation(len(prompts), req.n, max_tokens)
        return max_tokens

    def choices(self, req: _Sampling, prompts: list[list[int]], max_tokens: int,
                logprobs: Optional[int], emit=None) -> tuple[list[Choice], list[Job]]:
        """A choice per prompt and ``n``, and the jobs that answer them: one per choice when
        tokens are to be generated (``max_tokens`` > 0)."""
        seed = req.seed if req.seed is not None else new_seed()
        choices = [Choice(self.tokenizer, prompt, p * req.n + c, req.stops(), logprobs, emit)
                   for p, prompt in enumerate(prompts) for c in range(req.n)]
        if max_tokens == 0:
            return choices, []
        method = self.method(req, max_tokens, seed)
        # Followed token by token only when something needs it (streaming, stop strings,
        # logprobs); otherwise the text is decoded once at the end.
        follow = isinstance(method, GenerationConfig) and (
            emit is not None or bool(req.stops()) or logprobs is not None)
        jobs = [Job(choice.prompt_ids, method, seed=seed, choice=choice.index % req.n,
                    on_token=choice.on_token if follow else None) for choice in choices]
        return choices, jobs

    def submit(self, jobs: list[Job]):
        """The jobs queued together (concurrent futures), or a 429."""
        try:
            return self.engine.submit(jobs)
        except QueueFull as exc:
            self.metrics.rejected.labels(cause="queue_full").inc()
            raise APIError(429, str(exc), type="server_busy", code="queue_full",
                           headers={"Retry-After": f"{exc.retry_after_s:.0f}"}) from None

    def _too_long_in_queue(self, futures) -> None:
        """Withdraw the request's jobs and answer 503 if none has started."""
        if self.engine.withdraw(futures):
            self.metrics.rejected.labels(cause="max_queue_wait_s").inc()
            raise self.limits.queue_wait_exceeded(self.engine.retry_after_s(self.engine.waiting))

    async def results(self, futures) -> list:
        """The jobs' results; a 503 when none started within ``max_queue_wait_s``."""
        wrapped = [asyncio.wrap_future(f) for f in futures]
        limit = self.limits.max_queue_wait_s
        if limit and wrapped:
            _, pending = await asyncio.wait(wrapped, timeout=limit)
            if pending:
                self._too_long_in_queue(futures)
        return await _gather(wrapped)

    async def started(self, futures) -> None:
        """Wait until one of the jobs has started (a stream's headers wait for it), or 503."""
        limit = self.limits.max_queue_wait_s
        deadline = time.monotonic() + limit
        while limit and futures and not any(f.running() or f.done() for f in futures):
            if time.monotonic() >= deadline:
                self._too_long_in_queue(futures)
                return
            await asyncio.sleep(0.02)

    def account(self, jobs: list[Job], finished: list[dict], usage: dict[str, int]) -> None:
        """Tokens, times to first token and guarded refusals of an answered request."""
        self.metrics.tokens(usage["prompt_tokens"], usage["completion_tokens"])
        now = time.monotonic()
        for job in jobs:
            if job.started is not None and not isinstance(job.method, PromptScore):
                self.metrics.ttft.observe((job.first_token or now) - job.queued)
        for f in finished:
            if f["srp"]["short_circuited"]:
                self.metrics.refused(f["srp"]["finish"])


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
    """The FastAPI application serving ``server``, behind its gate."""
    app = FastAPI(title="megatron-srp", docs_url=None, redoc_url=None)
    app.add_middleware(Gate, metrics=server.metrics, limits=server.limits, drain=server.drain,
                       api_key=server.api_key)

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
    async def health() -> JSONResponse:
        status = "draining" if server.drain.draining else "ok"
        return JSONResponse({"status": status, "model": server.model_name,
                             "in_flight": server.drain.in_flight, **server.engine.stats},
                            status_code=503 if server.drain.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

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
        if req.echo and req.stream:
            raise APIError(400, "echo is not served with stream", "echo")
        max_tokens = server.check(req, prompts, req.max_tokens, "prompt", echo=req.echo)
        return await _respond(server, req, prompts, max_tokens, req.logprobs, chat=False,
                              echo=req.echo)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Union[JSONResponse, StreamingResponse]:
        prompt = chat_prompt_ids(server.tokenizer, [(m.role, m.content) for m in req.messages])
        limit = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        max_tokens = server.check(req, [prompt], limit, "messages")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await _respond(server, req, [prompt], max_tokens, logprobs, chat=True)

    return app


#: the srp object of a choice that generated nothing (echo with max_tokens 0)
NOTHING = {"finish": "length", "short_circuited": False, "category": None, "reflections": []}


async def _respond(server: Server, req: _Sampling, prompts: list[list[int]], max_tokens: int,
                   logprobs: Optional[int], chat: bool, echo: bool = False
                   ) -> Union[JSONResponse, StreamingResponse]:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": server.model_name}
    if req.stream:
        feed = _Feed()
        choices, jobs = server.choices(req, prompts, max_tokens, logprobs, feed.emit)
        futures = server.submit(jobs)
        await server.started(futures)  # a 503 is still a status, before the stream starts
        return StreamingResponse(_stream(server, choices, jobs, futures, feed, chat, head,
                                         sum(len(p) for p in prompts) * req.n),
                                 media_type="text/event-stream")
    choices, jobs = server.choices(req, prompts, max_tokens, logprobs)
    scores = [Job(p, PromptScore(top=logprobs)) for p in prompts] \
        if echo and logprobs is not None else []
    results = await server.results(server.submit(jobs + scores))
    if jobs:
        finished = [c.finish(r) for c, r in zip(choices, results)]
    else:
        finished = [{"text": "", "finish_reason": "length", "srp": dict(NOTHING),
                     "completion_tokens": 0} for _ in choices]
    body_choices = []
    for c, f in zip(choices, finished):
        item: dict[str, Any] = {"index": c.index, "finish_reason": f["finish_reason"],
                                "srp": f["srp"]}
        if chat:
            item["message"] = {"role": "assistant", "content": f["text"]}
            item["logprobs"] = c.logprobs_body(chat=True)
        else:
            if scores:
                c.echo = results[len(jobs) + c.index // req.n]
            text = server.tokenizer.detokenize(c.prompt_ids) + f["text"] if echo else f["text"]
            item["text"], item["logprobs"] = text, c.logprobs_body()
        body_choices.append(item)
    usage = _usage(prompts, req.n, finished)
    server.account(jobs, finished, usage)
    return JSONResponse({**head, "choices": body_choices, "usage": usage})


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Feed:
    """Pieces of text from the engine's thread, handed to the event loop in order:
    ``call_soon_threadsafe`` runs them before the done-callback of the same choice's future, so
    a choice's text always precedes its last chunk."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.pieces: list[tuple[int, str]] = []
        self.arrived = asyncio.Event()

    def _add(self, item: tuple[int, str]) -> None:
        self.pieces.append(item)
        self.arrived.set()

    def emit(self, index: int, text: str) -> None:
        if threading.get_ident() == self.thread:
            self._add((index, text))
        else:
            self.loop.call_soon_threadsafe(self._add, (index, text))

    def take(self) -> list[tuple[int, str]]:
        out = list(self.pieces)
        self.pieces.clear()
        self.arrived.clear()
        return out


async def _stream(server: Server, choices: list[Choice], jobs: list[Job], futures, feed: _Feed,
                  chat: bool, head: dict, prompt_tokens: int) -> AsyncIterator[str]:
    """Chunks as tokens are drawn; the last chunk of each choice carries its finish_reason
    (and its logprobs, when asked for)."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: Optional[str], reason: Optional[str] = None,
              extra: Optional[dict] = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            item: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            item = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [{**item, **(extra or {})}]})

    if chat:
        for c in choices:
            yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant",
                                                                         "content": ""},
                                             "finish_reason": None}]})
    waiting = {asyncio.wrap_future(f): c for f, c in zip(futures, choices)}
    signal = asyncio.ensure_future(feed.arrived.wait())
    finished_all = []
    while waiting:
        done, _ = await asyncio.wait([signal, *waiting], return_when=asyncio.FIRST_COMPLETED)
        for index, text in feed.take():
            yield chunk(index, text)
        if signal.done():
            signal = asyncio.ensure_future(feed.arrived.wait())
        for fut in [f for f in done if f in waiting]:
            choice = waiting.pop(fut)
            try:
                finished = choice.finish(fut.result())
            except Exception as exc:  # the batch failed: say so in the stream
                yield _sse(error_body(f"generation failed: {exc}", type="server_error"))
                continue
            finished_all.append(finished)
            for index, text in feed.take():
                yield chunk(index, text)
            extra = {"srp": finished["srp"]}
            if choice.logprobs is not None:
                extra["logprobs"] = choice.logprobs_body(chat=chat)
            yield chunk(choice.index, None, finished["finish_reason"], extra)
    signal.cancel()
    completion = sum(f["completion_tokens"] for f in finished_all)
    server.account(jobs, finished_all, {"prompt_tokens": prompt_tokens,
                                        "completion_tokens": completion})
    yield "data: [DONE]\n\n"
