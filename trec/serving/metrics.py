"""Prometheus metrics of a serving process (prometheus-client), exposed at ``GET /metrics``.

    trec_requests_total{endpoint, source, status}        requests answered
    trec_request_seconds{endpoint, source}               latency, from the request's arrival to its answer
    trec_batch_size                                      requests per micro-batch (one recommend_many call)
    trec_batch_seconds                                   time of a micro-batch in the worker thread
    trec_index_search_seconds                            time of one FAISS search (every shard, one call)
    trec_model_info{name, version, retriever, ranker, index, current}   1 for each loaded version (0: retired)
    trec_store_up                                        1 while the online store answers, 0 while degraded
    trec_feedback_total{event, positive}                 feedback events accepted
    trec_reloads_total{outcome}                          version reloads: started, done, failed

``endpoint`` is the route's path template (``/similar-items/{item_id}``; ``other`` for an unknown
path); ``source`` is the response's source (two_tower, two_stage, popularity) or ``none``. Each
app owns its registry, so two apps in one process (tests) do not collide. With ``--workers N``
the workers write their values to ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode, set by `trec serve` before anything imports prometheus-client) and every scrape, whichever
worker answers it, reports the sum over all of them: a scrape of one worker would undercount.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (.001, .0025, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .25, .5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client reads it when it is imported: where worker processes share their values."""


class ServingMetrics:
    """The metrics above, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("trec_requests", "Requests answered", ["endpoint", "source", "status"],
                                registry=self.registry)
        self.latency = Histogram("trec_request_seconds", "Request latency (arrival to answer)",
                                 ["endpoint", "source"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("trec_batch_size", "Requests per micro-batch", buckets=_BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_seconds = Histogram("trec_batch_seconds", "Micro-batch compute time (worker thread)",
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.index_search = Histogram("trec_index_search_seconds", "FAISS search time per call",
                                      buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.model_info = Gauge("trec_model_info", "The loaded versions (value 1)",
                                ["name", "version", "retriever", "ranker", "index", "current"], registry=self.registry,
                                multiprocess_mode="max")  # every worker serves the same versions
        self.store_up = Gauge("trec_store_up", "1 while the online store answers", registry=self.registry,
                              multiprocess_mode="min")  # one degraded worker makes the service degraded
        self.feedback = Counter("trec_feedback", "Feedback events accepted", ["event", "positive"],
                                registry=self.registry)
        self.reloads = Counter("trec_reloads", "Version reloads", ["outcome"], registry=self.registry)
        self._model_labels: set[tuple[str, ...]] = set()

    def set_models(self, loaded: list[tuple[str, object]], current: str) -> None:
        """``loaded``: (name, Recommender) of every loaded version; the previous set is replaced."""
        labels = set()
        for name, recommender in loaded:
            bundle = recommender.bundle
            ranker = bundle.manifest.get("ranker") or {}
            labels.add((name, recommender.version, bundle.manifest["retriever"]["model"], ranker.get("model", ""),
                        bundle.index.index_kind, str(name == current)))
        for gone in self._model_labels - labels:
            if MULTIPROCESS_DIR in os.environ:  # a worker's file keeps every series it wrote: say 0, not loaded
                self.model_info.labels(*gone).set(0)
            else:
                self.model_info.remove(*gone)
        for series in labels:
            self.model_info.labels(*series).set(1)
        self._model_labels = labels

    def set_store_up(self, up: bool) -> None:
        self.store_up.set(1 if up else 0)

    def observe_feedback(self, event: str, positive: bool) -> None:
        self.feedback.labels(event, str(positive).lower()).inc()

    def observe_reload(self, outcome: str) -> None:
        self.reloads.labels(outcome).inc()

    def observe_request(self, endpoint: str, source: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, source, str(status)).inc()
        self.latency.labels(endpoint, source).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        if MULTIPROCESS_DIR in os.environ:  # the values of every worker, summed
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class TimedIndex:
    """A :class:`~trec.export.search.ShardedIndex` whose ``search`` calls are timed into
    ``trec_index_search_seconds``; everything else is the index's own."""

    def __init__(self, index, metrics: ServingMetrics) -> None:
        self._index = index
        self._histogram = metrics.index_search

    def search(self, queries, k: int):
        started = time.perf_counter()
        try:
            return self._index.search(queries, k)
        finally:
            self._histogram.observe(time.perf_counter() - started)

    def __getattr__(self, name: str):
        return getattr(self._index, name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._index, name, value)  # index.nprobe = 32 reaches the index
