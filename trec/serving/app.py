"""The HTTP API of a :class:`~trec.serving.Recommender` (FastAPI; ``trec serve`` runs it on uvicorn).

    POST /recommend                  RecommendRequest's fields as JSON -> RecommendResponse as JSON
    GET  /similar-items/{item_id}?k= the k items nearest the item's vector
    GET  /health                     200 while the process is alive (500 when its bundle failed to load)
    GET  /ready                      200 once the bundle is loaded and warmed, 503 before
    GET  /metrics                    Prometheus text (:mod:`trec.serving.metrics`)
    GET  /model                      provenance: the bundle manifest's version and run bindings
    GET  /docs, /openapi.json        the schema

``create_app(recommender)`` serves a loaded recommender; ``create_app(bundle="EXPORT")`` loads one
in the background while /health answers. :func:`app_from_env` is the factory uvicorn calls in each
``--workers`` process (the bundle path and options come in ``TREC_SERVE_*`` variables).

/recommend requests go through the :class:`~trec.serving.batcher.MicroBatcher`; everything that
touches the model or the index runs in its one worker thread. Bad input is 422 with
``{"field", "message", "detail"}`` naming the field (``k``, ``filters.item_genres``,
``history[2]``, ``body`` for malformed JSON); an unexpected exception is 500, logged, and the
process keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from trec.serving.batcher import MicroBatcher
from trec.serving.metrics import CONTENT_TYPE, ServingMetrics, TimedIndex
from trec.serving.recommender import Recommender, Settings
from trec.serving.requests import RecommendRequest, RequestError

log = logging.getLogger("trec.serving")

ENV_BUNDLE, ENV_MAX_BATCH, ENV_MAX_WAIT = "TREC_SERVE_BUNDLE", "TREC_SERVE_MAX_BATCH", "TREC_SERVE_MAX_WAIT_MS"
ENV_THREADS, ENV_READY_DIR, ENV_VERIFY = "TREC_SERVE_THREADS", "TREC_SERVE_READY_DIR", "TREC_SERVE_VERIFY"
ENV_MAX_K, ENV_MIN_HISTORY = "TREC_SERVE_MAX_K", "TREC_SERVE_MIN_HISTORY"


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 64
    """Most /recommend requests in one recommend_many call (1: one at a time)."""
    max_wait_ms: float = 2.0
    """How long the first request of a batch waits for others."""
    threads: int | None = None
    """torch threads of the worker thread (None: torch's default)."""
    settings: Settings = field(default_factory=Settings)
    """The recommender's limits and cold-start thresholds (used when the app loads the bundle itself)."""


# ----------------------------------------------------------------------------------- schema


class RecommendBody(BaseModel):
    """POST /recommend (see :class:`~trec.serving.requests.RecommendRequest`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | int
    k: int = 10
    exclude_seen: bool = True
    history: list[str | int] | None = None
    user_features: dict[str, str | list[str | int] | float] | None = None
    context: dict[str, str | int] | None = None
    filters: dict[str, list[str | int]] | None = None
    rerank: bool = False
    candidates: int = 100


class ItemOut(BaseModel):
    item_id: str
    title: str | None
    score: float
    rank: int


class RecommendOut(BaseModel):
    items: list[ItemOut]
    source: str
    model_version: str
    route: str
    unknown_history: int


class SimilarOut(BaseModel):
    item_id: str
    items: list[ItemOut]
    model_version: str


class ErrorOut(BaseModel):
    field: str
    message: str
    detail: list[dict]


# ----------------------------------------------------------------------------------- app


class _State:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = ServingMetrics()
        self.recommender: Recommender | None = None
        self.batcher: MicroBatcher | None = None
        self.failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    async def start(self, recommender: Recommender) -> None:
        bundle = recommender.bundle
        bundle.index = TimedIndex(bundle.index, self.metrics)
        ranker = bundle.manifest.get("ranker") or {}
        self.metrics.set_model(recommender.version, bundle.manifest["retriever"]["model"], ranker.get("model", ""),
                               bundle.index.index_kind)
        batcher = MicroBatcher(recommender.recommend_many, self.options.max_batch, self.options.max_wait_ms,
                               self.options.threads, on_batch=self.metrics.observe_batch)
        await batcher.start()
        self.recommender, self.batcher = recommender, batcher
        # The loaded bundle (modules, tables, index) is permanent: keep it out of the garbage collector's full
        # passes, which otherwise stall every in-flight answer at once (p99 ~250 ms at 32 clients).
        gc.collect()
        gc.freeze()
        ready_dir = os.environ.get(ENV_READY_DIR)
        if ready_dir:  # `trec serve --workers N` counts these before it says the server is up
            Path(ready_dir, f"ready-{os.getpid()}").touch()

    async def load(self, path: str, verify: bool) -> None:
        try:
            recommender = await asyncio.to_thread(Recommender.load, path, self.options.settings, verify=verify)
            await self.start(recommender)
        except Exception as error:  # noqa: BLE001 - reported by /health and /ready
            self.failure = f"{type(error).__name__}: {error}"
            log.exception("loading the bundle %s failed", path)


def create_app(recommender: Recommender | None = None, bundle: str | None = None,
               options: ServeOptions = ServeOptions(), verify: bool = True) -> FastAPI:
    """The API over ``recommender``, or over the bundle at ``bundle`` loaded at startup (see the module docstring)."""
    if (recommender is None) == (bundle is None):
        raise ValueError("give a recommender or a bundle path")
    # torch.fx warns on every call of a torchrec module outside tracing (torchrec asks is_fx_tracing).
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    state = _State(options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = None
        if recommender is not None:
            await state.start(recommender)
        else:
            loading = asyncio.get_running_loop().create_task(state.load(bundle, verify))
        yield
        if loading is not None:
            loading.cancel()
        if state.batcher is not None:
            await state.batcher.stop()

    app = FastAPI(title="trec serving", version="1", lifespan=lifespan,
                  description="Recommendations from a trec export's servable bundle.")
    app.state.serving = state
    app.add_middleware(_Timing, metrics=state.metrics)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _add_routes(app, state)
    return app


def app_from_env() -> FastAPI:
    """The app of one ``trec serve --workers N`` process: the bundle and options from ``TREC_SERVE_*``."""
    threads = int(os.environ.get(ENV_THREADS, "0")) or None
    if threads:
        import torch

        torch.set_num_threads(threads)
    settings = Settings(max_k=int(os.environ.get(ENV_MAX_K, Settings.max_k)),
                        min_history=int(os.environ.get(ENV_MIN_HISTORY, Settings.min_history)))
    options = ServeOptions(int(os.environ.get(ENV_MAX_BATCH, "64")), float(os.environ.get(ENV_MAX_WAIT, "2")), threads,
                           settings)
    return create_app(bundle=os.environ[ENV_BUNDLE], options=options, verify=os.environ.get(ENV_VERIFY, "1") == "1")


_ERRORS = {422: {"model": ErrorOut, "description": "a bad request, naming its field"}}


def _add_routes(app: FastAPI, state: _State) -> None:
    @app.post("/recommend", response_model=RecommendOut, responses=_ERRORS)
    async def recommend(body: RecommendBody, request: Request) -> Response:
        """The top ``k`` items for a user (known, cold with history or features, or popularity)."""
        if not state.ready:
            return _not_ready(state)
        response = await state.batcher.submit(RecommendRequest(**dict(body)))
        request.state.source = response.source
        return _json(asdict(response))

    @app.get("/similar-items/{item_id}", response_model=SimilarOut, responses=_ERRORS)
    async def similar_items(item_id: str, k: int = Query(10)) -> Response:
        """The ``k`` items whose vectors score highest with the item's."""
        if not state.ready:
            return _not_ready(state)
        items = await state.batcher.call(state.recommender.similar_items, item_id, k)
        return _json({"item_id": item_id, "items": [asdict(item) for item in items],
                      "model_version": state.recommender.version})

    @app.get("/health")
    async def health() -> Response:
        """Alive (500 when the bundle failed to load: restart the process)."""
        if state.failure:
            return _json({"status": "failed", "error": state.failure}, 500)
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """200 once the bundle is loaded and warmed, 503 before."""
        return _json({"status": "ready"}) if state.ready else _not_ready(state)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/model")
    async def model() -> Response:
        """The served bundle's provenance (manifest version and run bindings) and the serving options."""
        if not state.ready:
            return _not_ready(state)
        bundle = state.recommender.bundle
        manifest = bundle.manifest
        return _json({"version": manifest["version"], "format_version": manifest["format_version"],
                      "created": manifest.get("created"), "retriever": manifest["retriever"],
                      "ranker": manifest["ranker"], "bundle": str(bundle.root),
                      "index": {"kind": bundle.index.index_kind, "num_vectors": bundle.index.num_vectors},
                      "serving": {**asdict(state.options), "pid": os.getpid()}})


def _json(content: object, status: int = 200) -> Response:
    return Response(json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(),
                    status_code=status, media_type="application/json")


def _not_ready(state: _State) -> Response:
    return _json({"status": "failed" if state.failure else "loading", "error": state.failure}, 503)


def _unprocessable(field: str, message: str, detail: list[dict]) -> Response:
    return _json({"field": field, "message": f"{field}: {message}", "detail": detail}, 422)


async def _request_error(request: Request, error: RequestError) -> Response:
    where = ("query" if error.field == "k" else "path") if request.method == "GET" else "body"
    return _unprocessable(error.field, error.message,
                          [{"loc": [where, *error.field.split(".")], "msg": error.message, "type": "value_error"}])


# Union members pydantic appends to an error's location (``user_id.str``, ``history.0.int``).
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    errors = error.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return _unprocessable("body", f"malformed JSON ({reason})", [_plain(first)])
    field, message = _field(first.get("loc", ())), str(first.get("msg"))
    if field == "body" and first.get("type") == "model_attributes_type":
        message = "expected a JSON object (send Content-Type: application/json)"
    return _unprocessable(field, message, [_plain(e) for e in errors[:10]])


def _field(loc: tuple) -> str:
    """``("body", "filters", "item_genres", 0, "str")`` -> ``filters.item_genres[0]``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    while parts and isinstance(parts[-1], str) and _UNION_TAG.match(parts[-1]):
        parts.pop()
    field = ""
    for part in parts:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    return field or (str(loc[0]) if loc else "body")


def _plain(error: dict) -> dict:
    return {"loc": [str(part) if not isinstance(part, int) else part for part in error.get("loc", ())],
            "msg": str(error.get("msg")), "type": str(error.get("type"))}


class _Timing:
    """ASGI middleware: every HTTP request's count and latency by endpoint, source and status; an
    exception that escapes a handler becomes a logged 500, never a dead worker."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]  # 0: no response started yet

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:  # noqa: BLE001 - one request must not take the worker down
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not status[0]:
                status[0] = 500
                await _json({"detail": "internal error (logged by the server)"}, 500)(scope, receive, send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            source = (scope.get("state") or {}).get("source", "none")
            self.metrics.observe_request(endpoint, source, status[0] or 500, time.perf_counter() - started)
