"""A bounded HTTP/1.1 load generator on asyncio (the built-in one of `trec bench serve`).

    result = drive("127.0.0.1", 8000, "/recommend", bodies, concurrency=32, seconds=5)
    result.qps, result.percentile(99), result.errors
    mixed = drive("127.0.0.1", 8000, None, [("/recommend", body), ("/feedback", event)], 32, seconds=5)
    mixed.percentile(99, "/feedback"), mixed.summary()["endpoints"]

``concurrency`` clients each keep one keep-alive connection and send one POST at a time
(closed loop: at most ``concurrency`` requests are in flight), cycling through ``bodies`` from
a shared position, for ``seconds`` or until ``requests`` have been sent. A body is bytes (POSTed
to ``path``) or a ``(path, bytes)`` pair, so one run can mix endpoints; latencies are also kept
per path. Each answer's latency
is measured from the first byte written to the last body byte read. A status other than 200, a
malformed answer or a broken connection counts as an error (the connection is reopened); the
latencies and the QPS count successful answers only.

:class:`ServerProcess` runs the server under test (``trec serve`` on a free loopback port) and
:func:`histogram_means` reads its ``/metrics`` page.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trec.errors import TrecError

REPO = Path(__file__).resolve().parents[2]
_RECONNECT_PAUSE_S = 0.01
"""After a failed connection: so that a refusing server is not hammered in a tight loop."""


@dataclass
class LoadResult:
    """What one :func:`drive` measured."""

    concurrency: int
    seconds: float
    """Wall time from the first request sent to the last answer read."""
    latencies: np.ndarray
    """(N,) seconds of each successful request, in completion order."""
    errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    """HTTP status → answers (0: no answer, the connection failed)."""
    by_path: dict[str, np.ndarray] = field(default_factory=dict)
    """path → (N_path,) seconds of its successful requests."""

    @property
    def completed(self) -> int:
        return int(len(self.latencies))

    @property
    def qps(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float, path: str | None = None) -> float:
        """The ``q``-th percentile latency in milliseconds, of every request or of ``path``'s (nan without one)."""
        latencies = self.latencies if path is None else self.by_path.get(path, np.empty(0))
        return float(np.percentile(latencies, q) * 1000) if len(latencies) else float("nan")

    def endpoint(self, path: str) -> dict:
        """Requests, QPS (its share of the run's) and p50/p99 of one path."""
        count = len(self.by_path.get(path, ()))
        return {"requests": count, "qps": round(count / self.seconds, 1) if self.seconds > 0 else 0.0,
                "p50_ms": round(self.percentile(50, path), 2), "p99_ms": round(self.percentile(99, path), 2)}

    def summary(self) -> dict:
        """The run's figures; ``endpoints`` (path → :meth:`endpoint`) when it mixed paths."""
        paths = sorted(self.by_path)
        mixed = {"endpoints": {path: self.endpoint(path) for path in paths}} if len(paths) > 1 else {}
        return {"concurrency": self.concurrency, "requests": self.completed, "errors": self.errors,
                "seconds": round(self.seconds, 3), "qps": round(self.qps, 1),
                "p50_ms": round(self.percentile(50), 2), "p95_ms": round(self.percentile(95), 2),
                "p99_ms": round(self.percentile(99), 2),
                "statuses": {str(status): count for status, count in sorted(self.statuses.items())}, **mixed}


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The bytes of one keep-alive ``POST path`` with a JSON ``body``."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode("ascii") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, the server keeps the connection open) of one HTTP/1.1 answer.

    Bodies framed by Content-Length or chunked transfer encoding; ValueError for anything else.
    """
    status_line = await reader.readline()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"malformed status line {status_line[:80]!r}")
    status = int(parts[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ValueError("connection closed inside the headers")
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get(b"connection") != b"close"
    if headers.get(b"transfer-encoding") == b"chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return status, b"".join(chunks), keep_alive
            chunks.append(chunk[:-2])
    if b"content-length" not in headers:
        raise ValueError("an answer with neither Content-Length nor chunked encoding")
    return status, await reader.readexactly(int(headers[b"content-length"])), keep_alive


class _Load:
    """The shared state of one run: the next (path, request bytes), the stop condition and the tallies."""

    def __init__(self, payloads: list[tuple[str, bytes]], seconds: float | None, requests: int | None) -> None:
        self.payloads, self.requests = payloads, requests
        self.sent = 0
        self.started = time.perf_counter()
        self.deadline = self.started + seconds if seconds is not None else float("inf")
        self.last = self.started
        self.latencies: list[float] = []
        self.by_path: dict[str, list[float]] = {}
        self.errors = 0
        self.statuses: Counter = Counter()

    def next_payload(self) -> tuple[str, bytes] | None:
        if time.perf_counter() >= self.deadline or (self.requests is not None and self.sent >= self.requests):
            return None
        payload = self.payloads[self.sent % len(self.payloads)]
        self.sent += 1
        return payload

    def done(self, path: str, status: int, latency: float | None) -> None:
        self.last = time.perf_counter()
        self.statuses[status] += 1
        if status == 200 and latency is not None:
            self.latencies.append(latency)
            self.by_path.setdefault(path, []).append(latency)
        else:
            self.errors += 1


async def _client(host: str, port: int, load: _Load) -> None:
    """One connection, one request at a time, reconnecting after an error."""
    reader = writer = None
    try:
        while (next_payload := load.next_payload()) is not None:
            path, payload = next_payload
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                start = time.perf_counter()
                writer.write(payload)
                status, _, keep_alive = await read_response(reader)
                load.done(path, status, time.perf_counter() - start)
                if not keep_alive:
                    writer.close()
                    reader = writer = None
            except (OSError, ValueError, asyncio.IncompleteReadError):
                load.done(path, 0, None)
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(_RECONNECT_PAUSE_S)
    finally:
        if writer is not None:
            writer.close()


Body = bytes | tuple[str, bytes]
"""A JSON body for the run's ``path``, or a (path, JSON body) pair."""


def _payloads(host: str, port: int, path: str | None, bodies: list[Body]) -> list[tuple[str, bytes]]:
    pairs = [(path, body) if isinstance(body, bytes) else body for body in bodies]
    if any(p is None for p, _ in pairs):
        raise TrecError("the load generator needs a path for a body given without one")
    return [(p, post_request(host, port, p, body)) for p, body in pairs]


async def drive_async(host: str, port: int, path: str | None, bodies: list[Body], concurrency: int,
                      seconds: float | None = None, requests: int | None = None) -> LoadResult:
    """:func:`drive` inside a running event loop."""
    if concurrency < 1:
        raise TrecError(f"concurrency must be at least 1, got {concurrency}")
    if not bodies:
        raise TrecError("the load generator needs at least one request body")
    if (seconds is None) == (requests is None):
        raise TrecError("give the load generator either a duration (seconds) or a request count")
    load = _Load(_payloads(host, port, path, bodies), seconds, requests)
    await asyncio.gather(*(_client(host, port, load) for _ in range(concurrency)))
    return LoadResult(concurrency, max(load.last - load.started, 1e-9), np.asarray(load.latencies),
                      load.errors, load.statuses, {p: np.asarray(v) for p, v in load.by_path.items()})


def drive(host: str, port: int, path: str | None, bodies: list[Body], concurrency: int,
          seconds: float | None = None, requests: int | None = None) -> LoadResult:
    """POST ``bodies`` (cycled; bytes to ``path``, or (path, bytes) pairs) to ``http://host:port``
    from ``concurrency`` keep-alive connections for ``seconds`` or ``requests`` requests in all
    (see the module docstring)."""
    return asyncio.run(drive_async(host, port, path, bodies, concurrency, seconds, requests))


# --------------------------------------------------------------------------------------------
# the server under test: `trec serve` in a child process
# --------------------------------------------------------------------------------------------


def child_env() -> dict:
    """This environment, unbuffered, with this checkout importable (a server started from any directory)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``trec serve EXPORT`` on a free loopback port, from ``with`` until its end (SIGTERM, then SIGKILL)."""

    def __init__(self, export: Path, options: list[str], startup_timeout: float) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.command = [sys.executable, "-m", "trec", "serve", str(export), "--host", self.host,
                        "--port", str(self.port), *options]
        self.startup_timeout = startup_timeout
        self.log = tempfile.TemporaryFile()

    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=timeout) as answer:
            return answer.read().decode()

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TrecError(f"trec serve exited with {self.proc.returncode} before /ready: {self._tail()}")
            try:
                self.get("/ready", timeout=2.0)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.__exit__()
        raise TrecError(f"trec serve was not ready within {self.startup_timeout:g} s: {self._tail()}")

    def _tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def __exit__(self, *_) -> None:
        stop_process(self.proc, 15)
        self.log.close()


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def histogram_means(text: str) -> dict[str, tuple[int, float]]:
    """Every histogram series of a Prometheus text page → (observations, mean value)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums, counts = {}, {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            key = f"{family.name}{{{labels}}}" if labels else family.name
            if sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = int(sample.value)
    return {key: (counts[key], sums[key] / counts[key]) for key in sums if counts.get(key)}
