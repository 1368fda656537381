"""`python -m npllama serve`: the OpenAI API over HTTP, requests decoding together as the rows of
one batch (npllama/server.py). Needs the `serve` extra: pip install "npllama[serve]"."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..errors import ArgumentError
from .common import (add_batch_size_option, add_model_options, add_speculation_options, check_batch_size,
                     check_model_options, check_speculation_options, load_draft, load_model)

DEFAULT_CONTEXT = 4096  # a row's positions unless -c says otherwise (llama-server's default -c)


HELP = "an OpenAI-compatible HTTP server, requests decoding together (needs npllama[serve])"
DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]


def add_arguments(p) -> None:
    add_model_options(p, None, f"positions of each request (prompt and answer); default: the model's, at most "
                      f"{DEFAULT_CONTEXT}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: a free one, printed)")
    p.add_argument("--parallel", "-np", type=int, default=8, help="requests decoding at once, each a row of the "
                   "batch and of the KV cache; later ones wait in order")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a row; more get a 503 "
                   "with Retry-After")
    p.add_argument("--api-key", help="require the header Authorization: Bearer KEY on /v1/ routes")
    p.add_argument("--alias", help="the model's name in the API (default: its file or directory name)")
    add_batch_size_option(p, "prompt tokens a prefill pass")
    add_speculation_options(p)


def run(args) -> int:
    check_model_options(args)
    check_batch_size(args)
    check_speculation_options(args)
    if not 1 <= args.parallel <= 256 or args.queue < 0 or not 0 <= args.port < 65536:
        raise ArgumentError("--parallel must be from 1 to 256, --queue >= 0 and --port from 0 to 65535")
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError:
        raise ArgumentError('serving needs the `serve` extra: pip install "npllama[serve]" (Starlette, '
                            'uvicorn)') from None
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # before loading, so that a port in use is said at once; listening, so that once "serving"
        listener.bind((args.host, args.port))  # is printed a client's connection waits in the backlog
        listener.listen(2048)
    except OSError as e:
        raise ArgumentError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; choose another --port "
                            "(0: a free one)") from None

    from ..server import Engine, Requests, make_app, one_malloc_arena
    one_malloc_arena()
    model = load_model(args)
    context = args.max_seq_len or min(model.args.max_seq_len, DEFAULT_CONTEXT)
    model.verbose = False  # no progress lines per request
    engine = Engine(model, args.parallel, context, args.queue, args.lookup, load_draft(args, model), args.draft_max,
                    args.batch_size)
    model_id = args.alias or Path(args.model or model.source or "npllama").name
    app = make_app(engine, Requests(model, model_id, context), args.api_key)
    engine.thread.start()
    host, port = listener.getsockname()[:2]
    kv_gb = engine.cache.nbytes / 2**30
    print(f"serving {model_id} on http://{host}:{port}/v1 ({args.parallel} requests at once, {context} "
          f"positions each; KV cache up to {kv_gb:.1f} GB, written as used)", flush=True)
    print("routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health; Ctrl-C stops",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[listener])
    return 0
