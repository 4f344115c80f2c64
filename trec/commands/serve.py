"""`trec serve`: the HTTP API of an export's servable bundle on uvicorn (:mod:`trec.serving.app`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from trec.errors import TrecError

if TYPE_CHECKING:
    from trec.serving.deployment import ServeOptions


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve recommendations over HTTP from an export's bundle",
        description="Load BUNDLE (an export directory of `trec export`, or its bundle/) or the CURRENT version of a "
        "--model-root, check every checksum, warm it up, and answer POST /recommend, POST /feedback, GET "
        "/similar-items/{item_id}, /experiments/{name}, POST /admin/reload (TREC_ADMIN_TOKEN), /health, /ready, "
        "/metrics, /model (OpenAPI at /docs). Prints `serving BUNDLE on http://HOST:PORT` once /ready answers 200.",
    )
    parser.add_argument("bundle", metavar="BUNDLE", nargs="?",
                        help="export directory (trec export --out) or its bundle/; or --model-root")
    parser.add_argument("--model-root", metavar="DIR",
                        help="serve the CURRENT version of a `trec publish` model root (reload: POST /admin/reload)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes, each loading the bundle (default 1; >1 needs a shared --store redis://)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="most concurrent /recommend requests answered in one model call (1: one at a time)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="how long a batch's first request waits for others (default 2)")
    parser.add_argument("--threads", type=int,
                        help="torch and FAISS (OpenMP) threads per worker (default: cores // workers)")
    parser.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for (default 1000)")
    parser.add_argument("--min-history", type=int, default=1,
                        help="history items (online + sent) that make an unknown user warm: the tower, not "
                             "popularity (default 1)")
    parser.add_argument("--hot-history", type=int, default=5,
                        help="history items from which an unknown user is hot (default 5)")
    parser.add_argument("--rerank-hot", action="store_true",
                        help="re-rank hot users' lists with the bundle's ranker unless a request says rerank: false")
    parser.add_argument("--store", default="memory",
                        help="online store of histories and experiment counters: memory (default, this process) "
                             "or redis://HOST:PORT/DB (shared by replicas)")
    parser.add_argument("--store-timeout-ms", type=float, default=50.0,
                        help="timeout of every store call (default 50); slower means degraded, not stuck")
    parser.add_argument("--events", metavar="DIR",
                        help="append every /feedback event to Parquet files in DIR (trec data prepare parquet "
                             "--label-col label reads them)")
    parser.add_argument("--event-labels", metavar="SPEC",
                        help="event=label pairs, e.g. purchase=1,like=0.9,click=0.5,view=0.4,dislike=0")
    parser.add_argument("--history-len", type=int,
                        help="online history items kept per user (default: the model's data.history_max_len)")
    parser.add_argument("--experiments", metavar="FILE",
                        help="an A/B experiment (YAML) whose arms are versions of --model-root")
    parser.add_argument("--watch-s", type=float, default=0.0,
                        help="poll --model-root's CURRENT every this many seconds and reload when it moves")
    parser.set_defaults(func=run)


def options_of(args: argparse.Namespace, threads: int) -> ServeOptions:
    """The :class:`~trec.serving.deployment.ServeOptions` of the command line."""
    from trec.serving.deployment import ServeOptions
    from trec.serving.events import DEFAULT_EVENT_LABELS, parse_event_labels
    from trec.serving.recommender import Settings

    settings = Settings(max_k=args.max_k, min_history=args.min_history, hot_history=args.hot_history,
                        rerank_hot=args.rerank_hot)
    labels = parse_event_labels(args.event_labels) if args.event_labels else dict(DEFAULT_EVENT_LABELS)
    return ServeOptions(bundle=args.bundle, model_root=args.model_root, max_batch=args.max_batch,
                        max_wait_ms=args.max_wait_ms, threads=threads, settings=settings, store=args.store,
                        store_timeout_ms=args.store_timeout_ms, events=args.events, event_labels=labels,
                        history_len=args.history_len, experiments=args.experiments, watch_s=args.watch_s)


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

    from trec.serving.app import ENV_OPTIONS, ENV_READY_DIR, create_app
    from trec.serving.bundle import Bundle
    from trec.serving.store import open_store
    from trec.serving.versions import current_path

    torch.set_num_threads(threads)
    options = options_of(args, threads)
    # Everything that can be refused is refused here, in one line, before the port is bound.
    first = Path(args.bundle) if args.bundle else current_path(args.model_root)
    Bundle.load(first)
    open_store(options.store).close()
    if options.experiments:
        from trec.serving.experiments import load_experiments

        load_experiments(options.experiments)
    options = dataclasses.replace(options, verified=str(first))  # not hashed again by the server
    sock = _bind(args.host, args.port)
    quiet = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5}
    shown = args.model_root or args.bundle
    if args.workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(options), **quiet))
        _announce(shown, sock, 1, None)
        server.run(sockets=[sock])
        return 0 if server.started else 1
    ready_dir = tempfile.mkdtemp(prefix="trec-serve-")
    os.environ.update({ENV_OPTIONS: options.to_json(), ENV_READY_DIR: ready_dir})
    config = uvicorn.Config("trec.serving.app:app_from_env", factory=True, workers=args.workers, **quiet)
    _announce(shown, sock, args.workers, ready_dir)
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        for directory in (ready_dir, metrics_dir):
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if (args.bundle is None) == (args.model_root is None):
        raise TrecError("trec serve: give BUNDLE or --model-root DIR (exactly one)")
    for name, value, least in (("--workers", args.workers, 1), ("--max-batch", args.max_batch, 1),
                               ("--max-k", args.max_k, 1), ("--min-history", args.min_history, 1),
                               ("--hot-history", args.hot_history, args.min_history),
                               ("--history-len", args.history_len or 1, 1),
                               ("--port", args.port, 0), ("--threads", args.threads or 1, 1)):
        if value < least:
            raise TrecError(f"trec serve: {name} must be >= {least}, got {value}")
    for name, value in (("--max-wait-ms", args.max_wait_ms), ("--watch-s", args.watch_s),
                        ("--store-timeout-ms", args.store_timeout_ms - 1e-9)):
        if not value >= 0:
            raise TrecError(f"trec serve: {name} must be {'> 0' if 'store' in name else '>= 0'}, got {value}")
    if args.port > 65535:
        raise TrecError(f"trec serve: --port must be at most 65535, got {args.port}")
    if args.workers > 1 and args.store == "memory":
        raise TrecError("trec serve: --workers > 1 needs a shared --store redis://HOST:PORT/DB (the memory store is "
                        "per process: a worker would not see the feedback another one took)")
    if args.workers > 1 and args.model_root is not None and args.watch_s == 0:
        raise TrecError("trec serve: --workers > 1 with --model-root needs --watch-s S (POST /admin/reload reaches one "
                        "worker; the others follow CURRENT only by polling it)")
    if args.experiments and args.model_root is None:
        raise TrecError("trec serve: --experiments needs --model-root (its arms are published versions)")


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
