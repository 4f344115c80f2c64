"""`trec serve`: the HTTP API of an export's servable bundle on uvicorn (:mod:`trec.serving.app`)."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from trec.errors import TrecError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve recommendations over HTTP from an export's bundle",
        description="Load BUNDLE (an export directory of `trec export`, or its bundle/), check every checksum, warm "
        "it up, and answer POST /recommend, GET /similar-items/{item_id}, /health, /ready, /metrics, /model "
        "(OpenAPI at /docs). Prints `serving BUNDLE on http://HOST:PORT` once /ready answers 200.",
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="export directory (trec export --out) or its bundle/")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes, each loading the bundle (default 1)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="most concurrent /recommend requests answered in one model call (1: one at a time)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="how long a batch's first request waits for others (default 2)")
    parser.add_argument("--threads", type=int,
                        help="torch and FAISS (OpenMP) threads per worker (default: cores // workers)")
    parser.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for (default 1000)")
    parser.add_argument("--min-history", type=int, default=1,
                        help="known history items that route an unknown user through the tower (cold start; "
                             "fewer, and no user features: popularity; default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.workers)
    # Before FAISS is imported: its OpenMP runtime (not torch's) reads the thread count once, when it loads;
    # worker processes inherit the variables.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    metrics_dir = None
    if args.workers > 1:  # before prometheus-client is imported (here and in the workers): /metrics sums the workers
        metrics_dir = tempfile.mkdtemp(prefix="trec-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    import torch
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from trec.serving.app import (ENV_BUNDLE, ENV_MAX_BATCH, ENV_MAX_K, ENV_MAX_WAIT, ENV_MIN_HISTORY, ENV_READY_DIR,
                                  ENV_THREADS, ENV_VERIFY, ServeOptions, create_app)
    from trec.serving.bundle import Bundle
    from trec.serving.recommender import Recommender, Settings

    torch.set_num_threads(threads)
    settings = Settings(max_k=args.max_k, min_history=args.min_history)
    options = ServeOptions(args.max_batch, args.max_wait_ms, threads, settings)
    quiet = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5}
    if args.workers == 1:
        # A bad bundle is one TrecError line, before the port is bound.
        recommender = Recommender.load(args.bundle, settings)
        sock = _bind(args.host, args.port)
        server = uvicorn.Server(uvicorn.Config(create_app(recommender, options=options), **quiet))
        _announce(args.bundle, sock, 1, None)
        server.run(sockets=[sock])
        return 0 if server.started else 1
    Bundle.load(args.bundle)  # verified once here; each worker then loads it without re-hashing
    sock = _bind(args.host, args.port)
    ready_dir = tempfile.mkdtemp(prefix="trec-serve-")
    os.environ.update({ENV_BUNDLE: str(Path(args.bundle).resolve()), ENV_MAX_BATCH: str(args.max_batch),
                       ENV_MAX_WAIT: str(args.max_wait_ms), ENV_THREADS: str(threads), ENV_VERIFY: "0",
                       ENV_READY_DIR: ready_dir, ENV_MAX_K: str(args.max_k), ENV_MIN_HISTORY: str(args.min_history)})
    config = uvicorn.Config("trec.serving.app:app_from_env", factory=True, workers=args.workers, **quiet)
    _announce(args.bundle, sock, args.workers, ready_dir)
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        for directory in (ready_dir, metrics_dir):
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for name, value, least in (("--workers", args.workers, 1), ("--max-batch", args.max_batch, 1),
                               ("--max-k", args.max_k, 1), ("--min-history", args.min_history, 1),
                               ("--port", args.port, 0), ("--threads", args.threads or 1, 1)):
        if value < least:
            raise TrecError(f"trec serve: {name} must be >= {least}, got {value}")
    if not args.max_wait_ms >= 0:
        raise TrecError(f"trec serve: --max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.port > 65535:
        raise TrecError(f"trec serve: --port must be at most 65535, got {args.port}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on the accepted connections only for a socket whose
    # protocol says TCP; without it every kept-alive request after the first waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise TrecError(f"trec serve: cannot listen on {host}:{port}: {error.strerror or error} "
                        "(choose another --port or --host)") from None
    sock.set_inheritable(True)  # the --workers processes accept on it
    return sock


def _announce(bundle: str, sock: socket.socket, workers: int, ready_dir: str | None) -> None:
    """Print the `serving ...` line once /ready answers 200 (and, with workers, every worker has loaded)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    probe_url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/ready"

    def wait() -> None:
        while True:
            loaded = workers == 1 or len(os.listdir(ready_dir)) >= workers
            if loaded and _answers(probe_url):
                print(f"serving {bundle} on http://{shown}:{port}", flush=True)
                return
            time.sleep(0.05)

    threading.Thread(target=wait, name="trec-serve-announce", daemon=True).start()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
