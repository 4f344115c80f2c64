"""The HTTP API of serving (FastAPI; ``trec serve`` runs it on uvicorn).

    POST /recommend                  RecommendRequest's fields as JSON -> RecommendResponse as JSON (+ arm)
    POST /feedback                   {user_id, item_id, event, timestamp?, context?} -> label, positive, ...
    GET  /similar-items/{item_id}?k= the k items nearest the item's vector
    GET  /experiments/{name}         per-arm impressions, clicks, CTR; each arm against the control
    POST /admin/reload               load the model root's CURRENT (and the arms), then swap (token required)
    GET  /health                     200 while the process is alive (500 when its first load failed)
    GET  /ready                      200 once a version is loaded and warmed ("degraded" while the store is
                                     down: answers still come, from the bundle's offline histories), 503 before
    GET  /metrics                    Prometheus text (:mod:`trec.serving.metrics`)
    GET  /model                      provenance: the served versions' manifests and run bindings
    GET  /docs, /openapi.json        the schema

``create_app(options)`` loads what the options name in the background while /health answers;
:func:`app_from_env` is the factory uvicorn calls in each ``--workers`` process (the options as JSON
in ``TREC_SERVE_OPTIONS``). What is loaded, routed and reloaded: :mod:`trec.serving.deployment`;
feedback and online histories: :mod:`trec.serving.online`.

/recommend and /feedback go through micro-batchers (:mod:`trec.serving.batcher`): one model call,
one store round trip and one fsync of the event log per batch. Bad input is 422 naming the field
(:mod:`trec.serving.schema`); an unexpected exception is 500, logged, and the process keeps serving.
/admin/* answers 403 unless ``TREC_ADMIN_TOKEN`` is set, and 401 without ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from trec.errors import TrecError
from trec.serving.batcher import MicroBatcher
from trec.serving.deployment import Deployment, ServeOptions
from trec.serving.experiments import report_json
from trec.serving.metrics import CONTENT_TYPE, ServingMetrics
from trec.serving.requests import RecommendRequest, RequestError
from trec.serving.schema import (ERRORS, FeedbackBody, FeedbackOut, RecommendBody, RecommendOut, SimilarOut,
                                 json_response, request_error, validation_error)
from trec.serving.store import redacted

log = logging.getLogger("trec.serving")

ENV_OPTIONS, ENV_READY_DIR, ENV_ADMIN_TOKEN = "TREC_SERVE_OPTIONS", "TREC_SERVE_READY_DIR", "TREC_ADMIN_TOKEN"


class _State:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = ServingMetrics()
        self.deployment = Deployment(options, self.metrics)
        self.feedback: MicroBatcher | None = None
        self.failure: str | None = None
        self.tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        return self.feedback is not None

    async def start(self) -> None:
        try:
            await self.deployment.load()
            online = self.deployment.online
            feedback = MicroBatcher(online.feedback_many, max(self.options.max_batch, 256), self.options.max_wait_ms)
            await feedback.start()
            self.feedback = feedback
        except Exception as error:  # noqa: BLE001 - reported by /health and /ready
            self.failure = f"{type(error).__name__}: {error}"
            log.exception("loading %s failed", self.options.model_root or self.options.bundle)
            return
        loop = asyncio.get_running_loop()
        if self.deployment.events is not None:
            self.tasks.append(loop.create_task(self._rotate_events()))
        if self.options.watch_s > 0 and self.options.model_root:
            self.tasks.append(loop.create_task(self.deployment.watch()))
        ready_dir = os.environ.get(ENV_READY_DIR)
        if ready_dir:  # `trec serve --workers N` counts these before it says the server is up
            Path(ready_dir, f"ready-{os.getpid()}").touch()

    async def _rotate_events(self) -> None:
        """Events older than the log's max age reach a Parquet file even when no new ones arrive."""
        while True:
            await asyncio.sleep(1.0)
            with suppress(OSError):  # a full disk: the events stay in the write-ahead file
                await asyncio.to_thread(self.deployment.events.maybe_rotate)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.feedback is not None:
            await self.feedback.stop()
        await self.deployment.close()


def create_app(options: ServeOptions) -> FastAPI:
    """The API over what ``options`` names, loaded at startup (see the module docstring)."""
    # torch.fx warns on every call of a torchrec module outside tracing (torchrec asks is_fx_tracing).
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    state = _State(options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.get_running_loop().create_task(state.start())
        yield
        loading.cancel()
        with suppress(asyncio.CancelledError):
            await loading
        await state.stop()

    app = FastAPI(title="trec serving", version="1", lifespan=lifespan,
                  description="Recommendations from trec's servable bundles, feedback and experiments.")
    app.state.serving = state
    app.add_middleware(_Timing, metrics=state.metrics)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    _add_routes(app, state, os.environ.get(ENV_ADMIN_TOKEN, ""))
    return app


def app_from_env() -> FastAPI:
    """The app of one ``trec serve --workers N`` process: the options from ``TREC_SERVE_OPTIONS``."""
    options = ServeOptions.from_json(os.environ[ENV_OPTIONS])
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    return create_app(options)


def _add_routes(app: FastAPI, state: _State, admin_token: str) -> None:
    deployment = state.deployment

    @app.post("/recommend", response_model=RecommendOut, responses=ERRORS)
    async def recommend(body: RecommendBody, request: Request) -> Response:
        """The top ``k`` items for a user (known, cold with history or features, or popularity)."""
        if not state.ready:
            return _not_ready(state)
        lane, arm = deployment.route(body.user_id)
        lane.active += 1  # before any await: a reload retires this lane only after the answer
        try:
            response = await lane.batcher.submit(RecommendRequest(**dict(body)))
        finally:
            lane.active -= 1
        request.state.source = response.source
        return json_response({**asdict(response), "version": lane.name if lane.published else None,
                              "arm": arm.name if arm else None})

    @app.post("/feedback", response_model=FeedbackOut, responses=ERRORS)
    async def feedback(body: FeedbackBody) -> Response:
        """Record one event: logged durably (with --events), the user's online history updated."""
        if not state.ready:
            return _not_ready(state)
        event = deployment.online.event(dict(body))
        try:
            result = await state.feedback.submit(event)
        except OSError as error:  # the event log could not write it: nothing was acknowledged
            return json_response({"status": "unavailable", "error": f"event log: {error}"}, 503)
        return json_response(asdict(result))

    @app.get("/similar-items/{item_id}", response_model=SimilarOut, responses=ERRORS)
    async def similar_items(item_id: str, k: int = Query(10)) -> Response:
        """The ``k`` items whose vectors score highest with the item's."""
        if not state.ready:
            return _not_ready(state)
        lane = deployment.lane_set.default
        lane.active += 1
        try:
            items = await lane.batcher.call(lane.recommender.similar_items, item_id, k)
        finally:
            lane.active -= 1
        return json_response({"item_id": item_id, "items": [asdict(item) for item in items],
                              "model_version": lane.recommender.version})

    @app.get("/experiments/{name}")
    async def experiment(name: str) -> Response:
        """Per-arm impressions, clicks and CTR of the running experiment, each arm against the control."""
        if not state.ready:
            return _not_ready(state)
        running = deployment.lane_set.experiment
        if running is None or running.name != name:
            return json_response({"error": f"no running experiment {name!r}"[:200]}, 404)
        report = await asyncio.to_thread(deployment.online.experiment_log.report, running)
        return json_response(report_json(report))

    @app.post("/admin/reload")
    async def reload(request: Request) -> Response:
        """Load the model root's CURRENT version (and the experiment's arms), then swap them in."""
        denied = _denied(request, admin_token)
        if denied is not None:
            return denied
        if not state.ready:
            return _not_ready(state)
        try:
            before, after = await deployment.reload()
        except TrecError as error:
            return json_response({"status": "failed", "error": str(error), "serving": deployment.lane_set.current}, 409)
        return json_response({"status": "reloaded", "previous": before, "current": after})

    @app.get("/health")
    async def health() -> Response:
        """Alive (500 when the first load failed: restart the process)."""
        if state.failure:
            return json_response({"status": "failed", "error": state.failure}, 500)
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """200 once loaded ("degraded" while the online store is down), 503 before."""
        if not state.ready:
            return _not_ready(state)
        store = deployment.store
        if not store.healthy:
            await asyncio.to_thread(store.check)  # the breaker may still be open: ask the server now
        status = "ready" if store.healthy else "degraded"
        return json_response({"status": status, "store": {"url": store.url, "up": store.healthy,
                                                          "error": store.last_error}})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/model")
    async def model() -> Response:
        """The served versions' provenance (manifest version and run bindings) and the serving options."""
        if not state.ready:
            return _not_ready(state)
        lane_set = deployment.lane_set
        versions = {name: _provenance(lane.recommender.bundle) for name, lane in lane_set.lanes.items()}
        current = versions[lane_set.current]
        options = {**asdict(state.options), "store": redacted(state.options.store), "pid": os.getpid()}
        return json_response({**current, "current": lane_set.current, "versions": versions,
                              "experiment": lane_set.experiment.name if lane_set.experiment else None,
                              "serving": options})


def _provenance(bundle) -> dict:
    manifest = bundle.manifest
    return {"version": manifest["version"], "format_version": manifest["format_version"],
            "created": manifest.get("created"), "retriever": manifest["retriever"], "ranker": manifest["ranker"],
            "bundle": str(bundle.root), "index": {"kind": bundle.index.index_kind,
                                                  "num_vectors": bundle.index.num_vectors}}


def _denied(request: Request, token: str) -> Response | None:
    if not token:
        return json_response({"error": f"admin endpoints are disabled (set {ENV_ADMIN_TOKEN})"}, 403)
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return json_response({"error": "missing or wrong token (Authorization: Bearer TOKEN)"}, 401)
    return None


def _not_ready(state: _State) -> Response:
    return json_response({"status": "failed" if state.failure else "loading", "error": state.failure}, 503)


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
                await json_response({"detail": "internal error (logged by the server)"}, 500)(scope, receive, send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            source = (scope.get("state") or {}).get("source", "none")
            self.metrics.observe_request(endpoint, source, status[0] or 500, time.perf_counter() - started)
