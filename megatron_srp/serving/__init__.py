"""Serving a checkpoint behind an OpenAI-compatible HTTP API (docs/serving.md).

``engine`` batches requests onto the KV-cache decoder, ``protocol`` checks request bodies,
``choices`` follows one answer as it is drawn, ``app`` holds the routes, ``server`` loads a
checkpoint and runs it under uvicorn."""
