"""Serving a checkpoint behind an OpenAI-compatible HTTP API (docs/serving.md).

``engine`` batches requests onto the KV-cache decoder, ``protocol`` checks request bodies,
``choices`` follows one answer as it is drawn, ``logprobs`` scores prompts and writes
log-probabilities out, ``limits`` caps what one request may cost, ``gate`` (API key, body size,
draining) and ``metrics`` (Prometheus) see every request, ``app`` holds the routes, ``drain``
stops on SIGTERM without dropping work, ``server`` loads a checkpoint and runs it under
uvicorn."""
