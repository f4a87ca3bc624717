"""Load a checkpoint and serve it under uvicorn (what ``tools/serve_srp.py`` runs).

The model runs in this one process: a checkpoint of any TP/PP layout is resharded on load to
one device (the GPU when there is one, else the CPU), as ``sample_srp.py`` does. SIGTERM
drains it (drain.py) and the process exits 0.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_srp.serving.app import Server, build_app
from megatron_srp.serving.engine import Engine
from megatron_srp.serving.limits import MAX_BODY_BYTES, MAX_QUEUE_WAIT_S, Limits

#: where the API key is read from when --api-key is not given
API_KEY_ENV = "SRP_API_KEY"

log = logging.getLogger("megatron_srp.serving")


@dataclass
class ServeConfig:
    """How to serve; every field is a ``serve_srp.py`` option of the same name."""

    checkpoint: str = "???"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: Optional[str] = None  # default: the run directory's name
    max_batch: int = 32        # requests decoded together at most
    max_queue: int = 256       # requests waiting at most; more are answered 429
    batch_wait_ms: float = 10.0  # how long a batch waits for company after its first request
    guard_segment_tokens: int = 256  # guarded decoding: tokens between reflections
    log_level: str = "warning"
    api_key: Optional[str] = None  # bearer token every /v1 request must send (None: open)
    max_body_bytes: int = MAX_BODY_BYTES  # 0: no limit
    max_prompt_tokens: Optional[int] = None  # None: 16 x the context; 0: no limit
    max_n_tokens: Optional[int] = None  # prompts x n x max_tokens; None: 8 x the context
    max_queue_wait_s: float = MAX_QUEUE_WAIT_S  # 0: wait as long as it takes
    drain_timeout_s: float = 30.0  # SIGTERM: how long requests in flight may still run

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_queue", "guard_segment_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        self.limits()  # checks the limits

    def limits(self) -> Limits:
        return Limits(self.max_body_bytes, self.max_prompt_tokens, self.max_n_tokens,
                      self.max_queue_wait_s)


def model_name(checkpoint: str | os.PathLike) -> str:
    """The name a checkpoint is served under by default: its run directory's name."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name.startswith("iter_") else path.name


def load_server(config: ServeConfig) -> Server:
    """The checkpoint loaded, its engine running: everything but the HTTP listener."""
    from megatron_srp.inference.sample import load_for_inference
    from megatron_srp.training.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(config.checkpoint)
    model, tokenizer, _ = load_for_inference(path)
    engine = Engine(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                    batch_wait_s=config.batch_wait_ms / 1000.0)
    name = config.served_model_name or model_name(config.checkpoint)
    return Server(engine, name, guard_segment_tokens=config.guard_segment_tokens,
                  limits=config.limits(),
                  api_key=config.api_key or os.environ.get(API_KEY_ENV, "").strip() or None)


def serve(config: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain (drain.py) and stop the engine."""
    import uvicorn

    from megatron_srp.serving.drain import DrainingServer

    server = load_server(config)
    app = build_app(server)
    keyed = ", API key required" if server.api_key else ""
    print(f"serving {server.model_name!r} ({config.checkpoint}) on "
          f"http://{config.host}:{config.port}/v1{keyed}", flush=True)
    uv = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port,
                                       log_level=config.log_level, timeout_graceful_shutdown=5),
                        server.drain, config.drain_timeout_s)
    try:
        uv.run()
    finally:
        server.engine.shutdown()
    print("stopped", flush=True)
