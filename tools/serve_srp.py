"""Serve a trained checkpoint behind an OpenAI-compatible HTTP API (docs/serving.md).

    python tools/serve_srp.py --checkpoint runs/tiny-cpu-demo [--port 8000]
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny-cpu-demo", "prompt": "ROMEO:", "max_tokens": 32}'

Endpoints: /v1/completions, /v1/chat/completions (the checkpoint's finetuning chat format),
/v1/models, /health, /metrics (Prometheus). Concurrent requests are batched; a full queue
answers 429. SIGTERM drains: new requests get 503, those in flight finish, then exit 0.
"""
import argparse
import sys

from megatron_srp import cli


@cli.tool_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (checkpoint.save) or one iter_N checkpoint in it")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the run directory's name)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="requests decoded together at most (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting at most; more get HTTP 429 (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a batch waits for more requests (default: %(default)s)")
    parser.add_argument("--guard-segment-tokens", type=int, default=256,
                        help="guarded decoding: tokens between reflections (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="bearer token every /v1 request must send (default: $SRP_API_KEY; "
                             "unset: no key)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger get 413; 0: no limit "
                             "(default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt tokens per request (all its prompts); 0: no limit "
                             "(default: 16 x the model's context)")
    parser.add_argument("--max-n-tokens", type=int, default=None,
                        help="prompts x n x max_tokens per request; 0: no limit "
                             "(default: 8 x the model's context)")
    parser.add_argument("--max-queue-wait-s", type=float, default=60.0,
                        help="a request not started after this long gets 503 with Retry-After; "
                             "0: no limit (default: %(default)s)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on SIGTERM, how long requests in flight may still run "
                             "(default: %(default)s)")
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")
    cli.add_common_args(parser, example="max_batch")
    args = cli.parse_args(parser, argv)

    from megatron_srp import quiet_megatron_warnings
    quiet_megatron_warnings()
    from megatron_srp.serving.server import ServeConfig, serve
    from megatron_srp.training.checkpoint import CheckpointError

    try:
        config = ServeConfig(checkpoint=args.checkpoint, host=args.host, port=args.port,
                             served_model_name=args.served_model_name, max_batch=args.max_batch,
                             max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms,
                             guard_segment_tokens=args.guard_segment_tokens,
                             log_level=args.log_level, api_key=args.api_key,
                             max_body_bytes=args.max_body_bytes,
                             max_prompt_tokens=args.max_prompt_tokens,
                             max_n_tokens=args.max_n_tokens,
                             max_queue_wait_s=args.max_queue_wait_s,
                             drain_timeout_s=args.drain_timeout_s)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve(config)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
