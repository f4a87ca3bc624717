"""``GET /metrics``: the server's counters in the Prometheus text format, for whatever scrapes
the fleet (``/health`` has a few counters as JSON; this is what dashboards and alerts read).

Each server has its own ``CollectorRegistry`` (not prometheus-client's global one), so two
servers in one process, or a test that builds several, never share or double-register series.
Every series is prefixed ``srp_``.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

#: the routes counted by name; anything else is counted as "other" (bounded label values)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The series, and the calls that update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("srp_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("srp_request_latency_seconds",
                                 "Time from a request's arrival to the end of its response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("srp_time_to_first_token_seconds",
                              "Time from a choice's queueing to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("srp_queue_depth", "Jobs (choices) waiting for the model",
                                 registry=r)
        self.in_flight = Gauge("srp_requests_in_flight", "HTTP requests being answered",
                               registry=r)
        self.batch_size = Histogram("srp_batch_size", "Jobs decoded together per batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("srp_prompt_tokens", "Prompt tokens of answered requests",
                                     registry=r)
        self.generated_tokens = Counter("srp_generated_tokens",
                                        "Tokens generated for answered requests", registry=r)
        self.rejected = Counter("srp_rejected_requests",
                                "Requests refused before decoding, by cause (a limit's name, "
                                "queue_full, unauthorized, draining)", ["cause"], registry=r)
        self.refusals = Counter("srp_guarded_refusals",
                                "Answers short-circuited to the safe completion, by cause "
                                "(tag: the harmfulness tag; reflection: an Unsafe reflection; "
                                "unchecked: a reflection that did not parse)", ["cause"],
                                registry=r)
        info = Gauge("srp_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model).set(1)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    @staticmethod
    def route(path: str) -> str:
        return path if path in ROUTES else "other"

    def answered(self, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def refused(self, finish: str) -> None:
        self.refusals.labels(cause=finish).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
