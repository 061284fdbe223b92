"""The ``serve`` subcommand: ``zuoyou serve [--model M] [--host 127.0.0.1] [--port 8000] ...``.

The main CLI calls ``add_parser(subparsers)``; ``python -m zuoyou.server.cli serve ...`` works too.
"""

from __future__ import annotations

import argparse
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API with a web page",
        description="OpenAI-compatible server: POST /v1/chat/completions, POST /v1/images/generations "
                    "(\"stream\": true for live previews), GET /v1/models, GET /health, and a web page at /.")
    from ..cli import _model_args

    _model_args(p)  # --model, --device, --dtype, --quantize, --kv-cache, as the other commands
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1-2 is often faster on a busy machine)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ZUOYOU_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ZUOYOU_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 429 (default 64)")
    p.add_argument("--max-batch-images", type=int, default=16, help="images drawn in one merged batch (default 16)")
    p.add_argument("--max-batch-chats", type=int, default=8, help="conversations decoded together (default 8)")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long the worker waits for more requests to merge (default 20)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds, queueing included")
    p.add_argument("--max-n", type=int, default=8, help="largest n for image requests (default 8)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens for chat (default 2048)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest uploaded image in pixels")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let chat messages reference http(s) image URLs (the server fetches them)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
    return p


def build_app(args):
    from ..cli import load_from_args
    from .app import create_app
    from .openai_schema import Limits

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = load_from_args(args)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                    max_n=args.max_n, max_tokens=args.max_tokens, request_timeout=args.timeout,
                    allow_remote_images=args.allow_remote_images)
    return create_app(pipe, api_key=args.api_key, max_queue=args.max_queue, limits=limits,
                      batch_window=args.batch_window_ms / 1000, max_image_rows=args.max_batch_images,
                      max_chat_rows=args.max_batch_chats)


def run(args) -> int:
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        print("zuoyou serve needs FastAPI and uvicorn: pip install 'zuoyou[serve]'", file=sys.stderr)
        return 2
    import uvicorn

    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr)
    app = build_app(args)
    print(f"zuoyou: serving {app.state.model_id} on http://{args.host}:{args.port}/ "
          f"(OpenAI base_url http://{args.host}:{args.port}/v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv=None) -> int:
    from ..errors import ZuoyouError

    parser = argparse.ArgumentParser(prog="zuoyou")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ZuoyouError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
