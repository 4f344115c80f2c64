"""`trec bench serve`: the built-in load generator against a tiny asyncio HTTP server (keep-alive,
bounded concurrency, counts, errors, chunked answers, latencies), the report's arithmetic, and one
very short real run against `trec serve` over a tiny bundle."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

import pytest
from training import run_command, trec_command

from trec.bench.loadgen import drive, drive_async, histogram_means
from trec.bench.mixed import MEMORY, REDIS, add_ratios, judge_mixed, mixed_sequence
from trec.bench.serve import BATCHED, SINGLE, add_speedups, judge, parse_levels
from trec.errors import TrecError


class TinyServer:
    """An HTTP/1.1 keep-alive server: answers each POST /recommend or /feedback with its body after ``delay`` s.

    A body ``{"fail": N}`` gets status N; ``{"close": true}`` closes the connection without an
    answer; ``chunked`` answers with chunked transfer encoding."""

    def __init__(self, delay: float = 0.0, chunked: bool = False) -> None:
        self.delay, self.chunked = delay, chunked
        self.bodies: list[bytes] = []
        self.paths: list[bytes] = []
        self.connections = self.in_flight = self.max_in_flight = 0

    async def __aenter__(self) -> "TinyServer":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                method, path, version = line.split()
                assert (method, version) == (b"POST", b"HTTP/1.1") and path in (b"/recommend", b"/feedback"), line
                self.paths.append(path)
                length = 0
                while (header := await reader.readline()) != b"\r\n":
                    name, _, value = header.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.bodies.append(body)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                await asyncio.sleep(self.delay)
                self.in_flight -= 1
                request = json.loads(body)
                if request.get("close"):
                    break
                writer.write(self.answer(request.get("fail", 200), body))
                await writer.drain()
        finally:
            writer.close()

    def answer(self, status: int, body: bytes) -> bytes:
        if self.chunked:
            middle = len(body) // 2
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:middle], body[middle:]))
            return b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (status, chunks)
        return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def bodies(count: int) -> list[bytes]:
    return [json.dumps({"user_id": str(n), "k": 10}).encode() for n in range(count)]


def run_against(server: TinyServer, payloads: list, concurrency: int, path: str | None = "/recommend", **limit):
    async def main():
        async with server:
            return await drive_async("127.0.0.1", server.port, path, payloads, concurrency, **limit)

    return asyncio.run(main())


def test_request_count_keep_alive_and_the_body_cycle():
    server = TinyServer(delay=0.002)
    result = run_against(server, bodies(7), 4, requests=50)
    assert (result.completed, result.errors, dict(result.statuses)) == (50, 0, {200: 50})
    assert server.connections == 4  # one keep-alive connection per client, reused
    assert Counter(server.bodies) == Counter(bodies(7) * 7 + bodies(7)[:1])  # cycled from a shared position
    assert result.qps == pytest.approx(50 / result.seconds)


def test_concurrency_is_bounded_and_latencies_measured():
    server = TinyServer(delay=0.02)
    result = run_against(server, bodies(3), 5, seconds=0.4)
    assert server.max_in_flight == 5
    assert result.errors == 0 and 40 <= result.completed <= 5 * 0.4 / 0.02 + 5
    assert 20 <= result.percentile(50) <= result.percentile(95) <= result.percentile(99) < 400
    summary = result.summary()
    assert summary["concurrency"] == 5 and summary["requests"] == result.completed and summary["p50_ms"] >= 20


def test_errors_are_counted_and_connections_reopened():
    mix = [b'{"user_id": "1"}', b'{"fail": 500}', b'{"close": true}', b'{"user_id": "2"}']
    server = TinyServer()
    result = run_against(server, mix, 2, requests=40)
    assert result.completed == 20 and result.errors == 20
    assert dict(result.statuses) == {200: 20, 500: 10, 0: 10}
    assert server.connections >= 10  # every closed connection was opened again


def test_chunked_answers_and_a_refusing_server():
    result = run_against(TinyServer(chunked=True), bodies(2), 2, requests=10)
    assert (result.completed, result.errors) == (10, 0)
    refused = drive("127.0.0.1", 1, "/recommend", bodies(1), 1, requests=3)  # nothing listens on port 1
    assert (refused.completed, refused.errors, dict(refused.statuses)) == (0, 3, {0: 3})
    with pytest.raises(TrecError, match="either a duration"):
        drive("127.0.0.1", 1, "/recommend", bodies(1), 1)


def test_histogram_means_speedups_and_targets():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    latency = Histogram("request_seconds", "latency", ["endpoint"], registry=registry)
    for value in (0.01, 0.03):
        latency.labels("/recommend").observe(value)
    means = histogram_means(generate_latest(registry).decode())
    assert means["request_seconds{endpoint=/recommend}"] == (2, pytest.approx(0.02))

    def row(mode, concurrency, qps, p99, rerank=False):
        return {"index": "flat", "rerank": rerank, "mode": mode, "concurrency": concurrency, "qps": qps,
                "p99_ms": p99, "errors": 0}

    rows = add_speedups([row(SINGLE, 1, 100, 5), row(SINGLE, 32, 200, 90), row(BATCHED, 1, 90, 6),
                         row(BATCHED, 32, 1200, 40), row(BATCHED, 64, 1500, 70), row(BATCHED, 32, 250, 80, True)])
    assert [r["speedup"] for r in rows] == [None, None, 0.9, 6.0, None, None]
    verdicts = judge(rows)
    assert verdicts["retrieval"]["met"] and verdicts["retrieval"]["best"]["qps"] == 1200  # 1500 misses p99
    assert not verdicts["rerank"]["met"] and verdicts["rerank"]["best"]["qps"] == 250
    assert verdicts["batching_speedup"]["met"] and verdicts["batching_speedup"]["best"]["concurrency"] == 32
    assert parse_levels("1, 8,32") == [1, 8, 32]
    with pytest.raises(TrecError, match="--concurrency"):
        parse_levels("1,0")


def test_a_short_real_run_writes_its_json(serving_export, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_command(trec_command(1, "bench", "serve", "--bundle", serving_export["export"], "--no-rerank",
                                    "--concurrency", "1,4", "--seconds", "0.5", "--warmup", "0.2", "--users", "20",
                                    "--threads", "1", "--json", out))
    report = json.loads(out.read_text())
    assert [(r["mode"], r["concurrency"]) for r in report["rows"]] == [
        (SINGLE, 1), (SINGLE, 4), (BATCHED, 1), (BATCHED, 4)]
    assert all(r["requests"] > 0 and r["errors"] == 0 and not r["rerank"] for r in report["rows"]), report["rows"]
    assert report["rows"][3]["speedup"] > 0 and "retrieval" in report["verdicts"]
    assert report["machine"] and report["date"] and "micro-batched" in proc.stdout


def test_one_run_mixes_paths_with_latencies_per_path():
    feedback = [("/feedback", json.dumps({"user_id": "1", "item_id": "2", "event": "click"}).encode())]
    server = TinyServer(delay=0.002)
    result = run_against(server, bodies(3) + feedback, 2, path="/recommend", requests=40)  # bytes go to path
    assert Counter(server.paths) == {b"/recommend": 30, b"/feedback": 10} and result.errors == 0
    assert {path: len(latencies) for path, latencies in result.by_path.items()} == {"/recommend": 30, "/feedback": 10}
    endpoints = result.summary()["endpoints"]
    assert endpoints["/feedback"]["requests"] == 10 and endpoints["/recommend"]["p99_ms"] >= 2
    assert result.percentile(99, "/feedback") >= 2 and math.isnan(result.percentile(99, "/similar"))
    assert "endpoints" not in run_against(TinyServer(), bodies(2), 1, requests=4).summary()  # one path: as before
    with pytest.raises(TrecError, match="needs a path"):
        drive("127.0.0.1", 1, None, bodies(1), 1, requests=1)


def test_the_mixed_sequence_and_the_redis_verdict():
    sequence = mixed_sequence([str(n) for n in range(100)], ["a", "b"], 400, 0.25, 0, 10, 50, False)
    assert sequence == mixed_sequence([str(n) for n in range(100)], ["a", "b"], 400, 0.25, 0, 10, 50, False)  # seeded
    kinds = Counter(path for path, _ in sequence)
    assert 70 <= kinds["/feedback"] <= 130 and kinds["/feedback"] + kinds["/recommend"] == 400
    events = [json.loads(body) for path, body in sequence if path == "/feedback"]
    assert {"click", "dislike"} <= {e["event"] for e in events} and {e["item_id"] for e in events} == {"a", "b"}
    recommended = {json.loads(body)["user_id"] for path, body in sequence if path == "/recommend"}
    assert {e["user_id"] for e in events} & recommended  # the same users give feedback and are recommended to

    def row(store, concurrency, qps, p99, errors=0):
        return {"index": "flat", "store": store, "concurrency": concurrency, "qps": qps, "p99_ms": p99, "errors": errors}

    rows = add_ratios([row(MEMORY, 8, 1000, 20), row(MEMORY, 32, 1200, 50), row(REDIS, 8, 800, 23), row(REDIS, 32, 900, 55)])
    assert [r["vs_memory"] for r in rows] == [None, None, 0.8, 0.75]
    assert judge_mixed(rows, "")["met"]
    slower = judge_mixed(rows[:3] + [row(REDIS, 32, 900, 61)], "")  # p99 61 > 1.2 x 50
    assert not slower["met"] and slower["worst"]["concurrency"] == 32
    assert not judge_mixed(rows[:3] + [row(REDIS, 32, 700, 40)], "")["met"]  # 700 < 0.7 x 1200
    assert judge_mixed(rows[:2], "no Redis")["met"] is None


def test_a_short_real_mixed_run_against_redis(serving_export, redis_server, tmp_path):
    out = tmp_path / "mix.json"
    proc = run_command(trec_command(1, "bench", "serve", "--bundle", serving_export["export"], "--mix", "0.3",
                                    "--no-rerank", "--concurrency", "4", "--seconds", "1", "--warmup", "0.2",
                                    "--users", "40", "--threads", "1", "--redis", redis_server.url, "--json", out))
    rows = json.loads(out.read_text())["mixed_rows"]
    assert [(r["store"], r["concurrency"]) for r in rows] == [(MEMORY, 4), (REDIS, 4)]
    for r in rows:
        assert r["errors"] == 0 and all(r["endpoints"][path]["requests"] > 0 for path in ("/recommend", "/feedback")), r
    assert rows[1]["vs_memory"] > 0 and "target redis_store: with Redis >= 70%" in proc.stdout
    assert "one-at-a-time baseline is skipped" in proc.stdout
