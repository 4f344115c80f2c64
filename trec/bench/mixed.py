"""`trec bench serve --mix SHARE`: recommendations and feedback together, embedded store against Redis.

A seeded sequence of requests: ``SHARE`` of them ``POST /feedback`` (positive events: click,
like, purchase; negative: view, dislike, by the server's default labels), the rest ``POST
/recommend``, for the same known users, so that their online histories really grow and are read
(the server reads them once per /recommend micro-batch and writes them once per /feedback
micro-batch). The micro-batched server is started twice, with ``--store memory`` and with
``--store REDIS``, side by side; at every ``--concurrency`` level each is driven in turn with that
sequence (so a drift in the machine's load touches both). There is no one-at-a-time baseline for
this workload.

Redis (``--redis``): ``auto`` starts a private ``redis-server`` (no persistence, loopback, a free
port) when one is on PATH and stops it afterwards, ``off`` measures the embedded store only, a
``redis://HOST:PORT/DB`` URL uses that server (its data is neither read nor flushed; histories
left there by an earlier run are capped like any others).

The target, "with Redis >= 70% of the embedded store's QPS at the same p99", is judged at each
concurrency level: where the embedded store's p99 (all requests) is P, Redis must reach QPS >= 0.7 x
the embedded store's QPS with p99 <= 1.2 x P. It is met when every level measured passes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from trec.bench.loadgen import LoadResult, ServerProcess, drive, free_port, stop_process
from trec.bench.serve import BATCHED, first_answer, known_users, server_options
from trec.errors import TrecError

MEMORY, REDIS = "memory", "redis"
QPS_SHARE, P99_SLACK = 0.7, 1.2
RULE = (f"at each concurrency, Redis QPS >= {QPS_SHARE:g} x memory QPS and Redis p99 <= {P99_SLACK:g} x memory p99 "
        "(all requests)")
EVENTS = {"click": 0.4, "like": 0.15, "purchase": 0.1, "view": 0.15, "dislike": 0.2}
"""Event → share of the feedback requests (65% positive by the default labels, 35% negative)."""


# --------------------------------------------------------------------------------------------
# the request sequence
# --------------------------------------------------------------------------------------------


def catalog_items(export: Path) -> list[str]:
    """Raw IDs of the bundle's items (the OOV row left out)."""
    from trec.serving.bundle import Bundle

    return [label for label in Bundle.load(export, verify=False).tables.id_labels("item_id") if label]


def mixed_sequence(users: list[str], items: list[str], count: int, share: float, seed: int, k: int,
                   candidates: int, rerank: bool) -> list[tuple[str, bytes]]:
    """``count`` (path, JSON body) pairs: /feedback with probability ``share``, else /recommend.

    Users come from a pool of about a quarter of ``count``, so each one gets both kinds of request."""
    rng = np.random.default_rng(seed)
    pool = rng.choice(users, size=min(len(users), max(1, count // 4)), replace=False)
    names, shares = list(EVENTS), np.array(list(EVENTS.values()))
    sequence = []
    for _ in range(count):
        user = str(pool[rng.integers(len(pool))])
        if rng.random() < share:
            event = {"user_id": user, "item_id": items[rng.integers(len(items))],
                     "event": names[rng.choice(len(names), p=shares / shares.sum())]}
            sequence.append(("/feedback", json.dumps(event).encode()))
        else:
            body = {"user_id": user, "k": k, "rerank": rerank, "candidates": candidates}
            sequence.append(("/recommend", json.dumps(body).encode()))
    return sequence


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


class PrivateRedis:
    """``redis-server`` on 127.0.0.1:PORT without persistence, from ``with`` until its end."""

    def __init__(self, binary: str) -> None:
        self.binary, self.port = binary, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "PrivateRedis":
        self.directory = tempfile.TemporaryDirectory(prefix="trec-bench-redis-")
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", self.directory.name],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise TrecError(f"{self.binary} did not answer PING on port {self.port} within 10 s")

    def __exit__(self, *_) -> None:
        stop_process(self.process, 10)
        self.directory.cleanup()


def check_redis_option(option: str) -> None:
    if option not in ("auto", "off") and not option.startswith("redis://"):
        raise TrecError(f"--redis: expected auto, off or redis://HOST:PORT/DB, got {option!r}")


@contextmanager
def redis_url(option: str) -> Iterator[tuple[str | None, str]]:
    """(the Redis URL to measure or None, a note saying which Redis, or why none) for ``--redis``."""
    if option == "off":
        yield None, "Redis skipped (--redis off)"
    elif option != "auto":
        yield option, f"Redis at {option}"
    elif (binary := shutil.which("redis-server")) is None:
        yield None, ("Redis skipped: redis-server is not on PATH (apt-get install redis-server, "
                     "or give --redis redis://HOST:PORT/DB)")
    else:
        with PrivateRedis(binary) as server:
            yield server.url, f"Redis: a private {binary} on port {server.port} (no persistence)"


# --------------------------------------------------------------------------------------------
# measuring and judging
# --------------------------------------------------------------------------------------------


def measure_level(server: ServerProcess, store: str, sequence: list[tuple[str, bytes]], concurrency: int,
                  args: argparse.Namespace) -> LoadResult:
    if args.warmup > 0:
        drive(server.host, server.port, None, sequence, concurrency, seconds=args.warmup)
    result = drive(server.host, server.port, None, sequence, concurrency, seconds=args.seconds)
    print(f"  c={concurrency:<4} {store:<7} {result.qps:>9,.0f} QPS  p99 {result.percentile(99):7.1f} ms (/recommend "
          f"{result.percentile(99, '/recommend'):.1f}, /feedback {result.percentile(99, '/feedback'):.1f})  "
          f"errors {result.errors}" + (f" (HTTP status: answers {dict(result.statuses)})" if result.errors else ""),
          flush=True)
    return result


def bench_mixed(export: Path, info: dict, levels: list[int], url: str | None, args: argparse.Namespace) -> list[dict]:
    """Rows of one bundle: the batched server with the embedded store and with Redis (``url``).

    Both servers run side by side and take turns at each level, so that a drift in the load of a
    shared machine touches both stores alike."""
    rerank = info["ranker"] and not args.no_rerank
    sequence = mixed_sequence(known_users(export), catalog_items(export), args.users, args.mix, args.seed, args.k,
                              args.candidates, rerank)
    stores = [(MEMORY, "memory")] + ([(REDIS, url)] if url else [])
    rows = []
    with ExitStack() as stack:
        servers = {store: stack.enter_context(ServerProcess(export, server_options(args, True) + ["--store", location],
                                                            args.startup_timeout)) for store, location in stores}
        print(f"{info['index']}, {args.mix:g} feedback, {'re-ranking' if rerank else 'retrieval only'}, {BATCHED}, "
              + ", ".join(f"--store {store} (port {server.port})" for store, server in servers.items()) + ":", flush=True)
        for server in servers.values():
            for path in ("/recommend", "/feedback"):  # a refused request stops the benchmark with the server's reason
                first_answer(server, next(body for p, body in sequence if p == path), path)
        for concurrency in levels:
            for store, server in servers.items():
                result = measure_level(server, store, sequence, concurrency, args)
                rows.append({"index": info["index"], "workload": f"mixed {args.mix:g}", "rerank": rerank,
                             "mode": BATCHED, "store": store, **result.summary()})
        down = [store for store, server in servers.items() if "trec_store_up 1.0" not in server.get("/metrics")]
    for r in rows:
        r["store_down_at_end"] = r["store"] in down
    rows.sort(key=lambda r: r["store"] != MEMORY)  # the table: every memory row, then every Redis row
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """vs_memory: a Redis row's QPS over the embedded store's at the same index and concurrency."""
    memory = {(r["index"], r["concurrency"]): r for r in rows if r["store"] == MEMORY}
    for r in rows:
        base = memory.get((r["index"], r["concurrency"]))
        r["vs_memory"] = round(r["qps"] / base["qps"], 2) if r["store"] == REDIS and base and base["qps"] else None
    return rows


def judge_mixed(rows: list[dict], note: str) -> dict:
    """The Redis target by :data:`RULE`: met when every (index, concurrency) pair passes; the worst pair."""
    memory = {(r["index"], r["concurrency"]): r for r in rows if r["store"] == MEMORY}
    pairs = [(memory[(r["index"], r["concurrency"])], r) for r in rows
             if r["store"] == REDIS and (r["index"], r["concurrency"]) in memory]
    if not pairs:
        return {"rule": RULE, "met": None, "note": note}
    checks = [{"index": m["index"], "concurrency": m["concurrency"], "qps_ratio": round(r["qps"] / max(m["qps"], 1e-9), 2),
               "memory_p99_ms": m["p99_ms"], "redis_p99_ms": r["p99_ms"],
               "ok": not m["errors"] and not r["errors"] and r["qps"] >= QPS_SHARE * m["qps"]
               and r["p99_ms"] <= P99_SLACK * m["p99_ms"]} for m, r in pairs]
    worst = min(checks, key=lambda c: (c["ok"], c["qps_ratio"]))
    return {"rule": RULE, "met": all(c["ok"] for c in checks), "note": note, "worst": worst, "levels": checks}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def format_mixed(rows: list[dict]) -> str:
    header = (f"{'index':<22} {'store':<7} {'clients':>7} {'QPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'rec p50':>8} "
              f"{'rec p99':>8} {'fb p50':>7} {'fb p99':>7} {'errors':>6} {'vs mem':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        rec, fb = (r.get("endpoints", {}).get(path, {}) for path in ("/recommend", "/feedback"))
        ratio = f"{r['vs_memory']:.2f}" if r.get("vs_memory") else ""
        lines.append(f"{r['index']:<22} {r['store']:<7} {r['concurrency']:>7} {r['qps']:>8,.0f} {r['p50_ms']:>7.1f} "
                     f"{r['p99_ms']:>7.1f} {rec.get('p50_ms', float('nan')):>8.1f} {rec.get('p99_ms', float('nan')):>8.1f} "
                     f"{fb.get('p50_ms', float('nan')):>7.1f} {fb.get('p99_ms', float('nan')):>7.1f} {r['errors']:>6} "
                     f"{ratio:>7}")
    return "\n".join(lines)


def format_verdict(verdict: dict) -> str:
    goal = f"target redis_store: with Redis >= {QPS_SHARE:.0%} of the embedded store's QPS at the same p99"
    if verdict["met"] is None:
        return f"{goal}: not judged ({verdict['note']})"
    w = verdict["worst"]
    return (f"{goal}: {'met' if verdict['met'] else 'NOT met'} (rule: {verdict['rule']}); worst {w['qps_ratio']:.2f}x "
            f"QPS at p99 {w['redis_p99_ms']:.1f} vs {w['memory_p99_ms']:.1f} ms ({w['index']}, {w['concurrency']} clients)")


def run_mixed(exports: list[Path], infos: list[dict], levels: list[int], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The mixed workload over every bundle: (rows, verdict), printed."""
    rows = []
    with redis_url(args.redis) as (url, note):
        print(f"mixed workload: {args.mix:.0%} /feedback; {note}; the one-at-a-time baseline is skipped", flush=True)
        for export, info in zip(exports, infos):
            rows += bench_mixed(export, info, levels, url, args)
    verdict = judge_mixed(rows, note)
    print()
    print(format_mixed(rows))
    print(f"\nk={args.k}, {args.seconds:g} s per row after {args.warmup:g} s warm-up; micro-batched = --max-batch "
          f"{args.max_batch} --max-wait-ms {args.max_wait_ms:g}; rec/fb = /recommend, /feedback; vs mem = QPS over "
          f"--store memory")
    for index, store in sorted({(r["index"], r["store"]) for r in rows if r["store_down_at_end"]}):
        print(f"warning: {index} --store {store}: the server reported its store down (degraded) at the end")
    print(format_verdict(verdict))
    return rows, verdict
