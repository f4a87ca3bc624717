"""The gate every HTTP request passes before a route sees it: draining (503 once SIGTERM has
come), the API key (401), the body's size (413), and the request counts and latency that
``/metrics`` reports, with the count of requests in flight that draining waits for.

It is plain ASGI middleware rather than FastAPI dependencies so that it answers before the body
is parsed (a body over the limit is never read whole) and sees every response's status,
streaming ones included, the routes' own errors included.
"""
from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Optional

from megatron_srp.serving.limits import Limits
from megatron_srp.serving.metrics import Metrics
from megatron_srp.serving.protocol import APIError, error_body

#: routes that need no key and are answered while draining (/health says "draining")
OPEN = ("/health", "/metrics")


@dataclass
class DrainState:
    """Shared by the gate (which counts) and the server loop (which waits for zero)."""

    draining: bool = False
    in_flight: int = 0


class Gate:
    """ASGI middleware: ``Gate(app, ...)``."""

    def __init__(self, app: Any, metrics: Metrics, limits: Limits, drain: DrainState,
                 api_key: Optional[str] = None) -> None:
        self.app, self.metrics, self.limits, self.drain = app, metrics, limits, drain
        self.api_key = api_key or None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, started, status = scope["path"], time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = path not in OPEN
        if counted:
            self.drain.in_flight += 1
            self.metrics.in_flight.inc()
        try:
            refusal, cause = self._refusal(scope, path)
            if refusal is None and counted and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, refusal = await self._read_body(scope, receive)
                cause = "max_body_bytes"
            if refusal is not None:
                self.metrics.rejected.labels(cause=cause).inc()
                await _reply(sending, refusal)
            elif receive is not None:
                await self.app(scope, receive, sending)
        finally:
            if counted:
                self.drain.in_flight -= 1
                self.metrics.in_flight.dec()
            self.metrics.answered(path, status[0], time.perf_counter() - started)

    def _refusal(self, scope: dict, path: str) -> tuple[Optional[APIError], str]:
        if path in OPEN:
            return None, ""
        if self.drain.draining:
            return APIError(503, "The server is shutting down; send the request elsewhere or "
                                 "retry later", type="server_busy", code="draining",
                            headers={"Retry-After": "5", "Connection": "close"}), "draining"
        if self.api_key is not None:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                message = ("Incorrect API key provided" if given else
                           "No API key provided: send 'Authorization: Bearer KEY'")
                return APIError(401, message, type="invalid_request_error",
                                code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"}), "unauthorized"
        return None, ""

    async def _read_body(self, scope: dict, receive: Any) -> tuple[Any, Optional[APIError]]:
        """The body read whole (at most the limit), and a ``receive`` that replays it; or the
        413 when it is larger (by its Content-Length, or as it arrives)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():
            too_large = self.limits.body_too_large(int(length))
            if too_large is not None:
                return None, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            body = message.get("body", b"")
            size += len(body)
            too_large = self.limits.body_too_large(size)
            if too_large is not None:
                return None, too_large
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole, replayed = b"".join(chunks), [False]

        async def replay() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        return replay, None


async def _reply(send: Any, error: APIError) -> None:
    data = json.dumps(error_body(error.message, error.param, error.type, error.code)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
