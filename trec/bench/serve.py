"""`trec bench serve`: `trec serve` under load, micro-batched against one request at a time (issue 14).

For each bundle (an export: ``--bundle``, repeatable; by default two small ML-100K bundles built
here once, the same runs exported with an exact ``flat`` and an ``ivf_flat`` index, both with a
DCN ranker) it starts ``trec serve`` on a free loopback port twice: micro-batched
(``--max-batch``, ``--max-wait-ms``) and one request at a time (``--max-batch 1``, the baseline,
measured in the same run). Each server is driven at every ``--concurrency`` level by the built-in
asyncio load generator (:mod:`trec.bench.loadgen`) with ``POST /recommend`` (k = 10) for a fixed,
seeded mix of known users, without and with re-ranking ``--candidates`` items by the ranker.
It reports QPS and p50/p95/p99 latency, the micro-batching speed-up, and the targets; when one
is missed, where the time goes: the server's own ``/metrics`` histograms and a cProfile of
``Recommender.recommend_many`` over one full batch in this process. The server and the load
generator share this machine's cores, as the issue's targets assume.

``--mix SHARE`` measures a mixed workload instead (``SHARE`` of the requests ``POST /feedback``),
the micro-batched server with ``--store memory`` against ``--store`` Redis (``--redis auto|off|URL``),
without the one-at-a-time baseline; the target "with Redis >= 70% of the embedded store's QPS at
the same p99" is judged per level: Redis QPS >= 0.7 x memory QPS and Redis p99 <= 1.2 x memory p99
(:mod:`trec.bench.mixed`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

from trec.bench.loadgen import LoadResult, ServerProcess, child_env, drive, histogram_means
from trec.errors import TrecError
from trec.io import atomic_write_json, read_json_object

REPO = Path(__file__).resolve().parents[2]
ML100K = REPO.parent / "shared" / "datasets" / "ml-100k"
TARGETS = {"retrieval": {"qps": 1000.0, "p99_ms": 50.0}, "rerank": {"qps": 300.0, "p99_ms": 100.0},
           "batching_speedup": 3.0}
BATCHED, SINGLE = "micro-batched", "one at a time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", metavar="EXPORT", action="append",
                        help="an export with a bundle (repeatable); default: ML-100K bundles (flat and ivf_flat "
                             "index, with a DCN ranker) built once under --cache")
    parser.add_argument("--cache", metavar="DIR", default="data/bench-serve",
                        help="where the default bundles are built and reused (default data/bench-serve)")
    parser.add_argument("--ml100k", metavar="DIR", default=str(ML100K), help="MovieLens 100K for the default bundles")
    parser.add_argument("--concurrency", default="1,8,16,32,64", help="comma-separated client counts (default 1,8,16,32,64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each measurement")
    parser.add_argument("--k", type=int, default=10, help="items per /recommend answer (default 10)")
    parser.add_argument("--candidates", type=int, default=100, help="items re-ranked by the ranker (default 100)")
    parser.add_argument("--users", type=int, default=1000, help="requests in the seeded mix of known users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=64, help="trec serve --max-batch of the batched server")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="trec serve --max-wait-ms")
    parser.add_argument("--threads", type=int, default=0, help="trec serve --threads (0: the server's default)")
    parser.add_argument("--workers", type=int, default=0, help="trec serve --workers (0: the server's default)")
    parser.add_argument("--no-rerank", action="store_true", help="skip the re-ranking measurements")
    parser.add_argument("--mix", metavar="FEEDBACK_SHARE", type=float, default=None,
                        help="measure a mixed workload instead: this share of the requests POST /feedback, the rest "
                             "/recommend, with --store memory and with Redis (default: /recommend only)")
    parser.add_argument("--redis", default="auto",
                        help="with --mix: auto (a private redis-server when on PATH), off, or redis://HOST:PORT/DB")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for GET /ready")


# --------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------


def _step(cache: Path, name: str, *command: object) -> None:
    """Run ``python -m trec COMMAND`` once: a ``.done-NAME`` marker makes a later run reuse its output."""
    marker = cache / f".done-{name}"
    if marker.is_file():
        return
    print(f"building the benchmark bundles: {name} ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "trec", *map(str, command)], capture_output=True, text=True,
                          cwd=REPO, env=child_env())
    if proc.returncode != 0:
        raise TrecError(f"building the benchmark bundles: 'trec {' '.join(map(str, command[:2]))}' failed "
                        f"({proc.returncode}): {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    marker.touch()


def default_bundles(cache: Path, ml100k: Path) -> list[Path]:
    """Two exports of one ML-100K two-tower run (flat, ivf_flat), both with a DCN ranker; built once.

    As the quickstart prepares and trains (one process, short runs: throughput does not depend on
    how well the model learned)."""
    if not (ml100k / "u.data").is_file():
        raise TrecError(f"{ml100k}: MovieLens 100K not found (give --ml100k DIR, or --bundle EXPORT)")
    cache.mkdir(parents=True, exist_ok=True)
    data, tt, dcn = cache / "data", cache / "two_tower", cache / "dcn"
    quiet = ["checkpoint.every_steps=0", "logging.projector_items=0", "logging.histogram_every_steps=0"]
    _step(cache, "prepare", "data", "prepare", "movielens", "--source", ml100k, "--out", data, "--split",
          "stratified", "--test-fraction", "0.25", "--val-fraction", "0.1", "--seed", "42", "--overwrite")
    _step(cache, "two_tower", "train", "--config", "configs/movielens_two_tower.yaml", "--data", data,
          "--run-dir", tt, "training.max_steps=300", *quiet)
    _step(cache, "dcn", "train", "--config", "configs/movielens_dcn.yaml", "--data", data, "--run-dir", dcn,
          "training.max_steps=200", *quiet)
    exports = []
    for kind in ("flat", "ivf_flat"):
        out = cache / f"export-{kind}"
        _step(cache, f"export-{kind}", "export", "--run-dir", tt, "--out", out, "--ranker-run-dir", dcn,
              "--overwrite", "--set", f"export.index={kind}")
        exports.append(out)
    return exports


def describe(export: Path) -> dict:
    """Index kind, nprobe, catalog size and whether the bundle has a ranker."""
    manifest = read_json_object(export / "manifest.json")
    bundle = read_json_object(export / "bundle" / "manifest.json")
    search = manifest.get("search_defaults") or {}
    label = manifest["index_kind"] + (f" (nprobe {search['nprobe']})" if "nprobe" in search else "")
    return {"export": str(export), "index": label, "factory": manifest["factory"], "items": manifest["num_vectors"],
            "ranker": bundle.get("ranker") is not None, "version": bundle.get("version")}


def known_users(export: Path) -> list[str]:
    """Raw IDs of the bundle's known users (a positive training row: the tower personalises them)."""
    from trec.serving.bundle import Bundle

    bundle = Bundle.load(export, verify=False)
    labels = bundle.tables.id_labels("user_id")
    known = [str(labels[int(user)]) for user in np.flatnonzero(bundle.positive_users)]
    if not known:
        raise TrecError(f"{export}: the bundle has no known user to ask for")
    return known


def request_mix(users: list[str], count: int, seed: int, k: int, candidates: int, rerank: bool) -> list[bytes]:
    """``count`` JSON bodies of /recommend for ``users`` drawn with ``seed`` (the same users whatever ``rerank``)."""
    drawn = np.random.default_rng(seed).choice(len(users), size=count)
    return [json.dumps({"user_id": users[int(n)], "k": k, "rerank": rerank, "candidates": candidates}).encode()
            for n in drawn]


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def server_options(args: argparse.Namespace, batched: bool) -> list[str]:
    options = ["--max-batch", str(args.max_batch if batched else 1), "--max-wait-ms", f"{args.max_wait_ms:g}"]
    if args.threads:
        options += ["--threads", str(args.threads)]
    if args.workers:
        options += ["--workers", str(args.workers)]
    return options


def first_answer(server: ServerProcess, body: bytes, path: str = "/recommend") -> None:
    """Send one request before the load: a refused one (e.g. 422) stops the benchmark with the server's reason."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{server.host}:{server.port}{path}", body,
                                     {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30).read()
    except urllib.error.HTTPError as error:
        raise TrecError(f"trec serve answered {error.code} to {body.decode()}: {error.read().decode()[:300]}") from None


def measure(server: ServerProcess, bodies: list[bytes], levels: list[int], args: argparse.Namespace) -> list[LoadResult]:
    first_answer(server, bodies[0])
    results = []
    for concurrency in levels:
        if args.warmup > 0:
            drive(server.host, server.port, "/recommend", bodies, concurrency, seconds=args.warmup)
        result = drive(server.host, server.port, "/recommend", bodies, concurrency, seconds=args.seconds)
        results.append(result)
        print(f"  c={concurrency:<4} {result.qps:>9,.0f} QPS  p50 {result.percentile(50):7.1f} ms  "
              f"p99 {result.percentile(99):7.1f} ms  errors {result.errors}"
              + (f" (HTTP status: answers {dict(result.statuses)})" if result.errors else ""), flush=True)
    return results


def bench_bundle(export: Path, info: dict, levels: list[int], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Rows of one bundle (both servers, each rerank setting, each level) and the batched server's histograms."""
    reranks = [False] + ([True] if info["ranker"] and not args.no_rerank else [])
    users = known_users(export)
    mixes = {rerank: request_mix(users, args.users, args.seed, args.k, args.candidates, rerank) for rerank in reranks}
    rows, metrics = [], {}
    for mode in (SINGLE, BATCHED):
        with ServerProcess(export, server_options(args, mode == BATCHED), args.startup_timeout) as server:
            for rerank in reranks:
                print(f"{info['index']}, {'re-ranking ' + str(args.candidates) if rerank else 'retrieval only'}, "
                      f"{mode} (port {server.port}):", flush=True)
                for result in measure(server, mixes[rerank], levels, args):
                    rows.append({"index": info["index"], "rerank": rerank, "mode": mode, **result.summary()})
            if mode == BATCHED:
                metrics = histogram_means(server.get("/metrics"))
    return rows, metrics


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup: a batched row's QPS over the one-at-a-time row of the same index, rerank and concurrency."""
    single = {(r["index"], r["rerank"], r["concurrency"]): r["qps"] for r in rows if r["mode"] == SINGLE}
    for r in rows:
        base = single.get((r["index"], r["rerank"], r["concurrency"]))
        r["speedup"] = round(r["qps"] / base, 2) if r["mode"] == BATCHED and base else None
    return rows


def judge(rows: list[dict]) -> dict:
    """Each target: met or not, and the batched row that comes closest (the most QPS within the p99 bound)."""
    verdicts = {}
    for name, rerank in (("retrieval", False), ("rerank", True)):
        target = TARGETS[name]
        batched = [r for r in rows if r["mode"] == BATCHED and r["rerank"] == rerank and not r["errors"]]
        if not batched:
            continue
        within = [r for r in batched if r["p99_ms"] <= target["p99_ms"]]
        best = max(within or batched, key=lambda r: r["qps"])
        verdicts[name] = {"target": target, "met": bool(within and best["qps"] >= target["qps"]),
                          "best": {key: best[key] for key in ("index", "concurrency", "qps", "p99_ms")}}
    speedups = [r for r in rows if r.get("speedup")]
    if speedups:
        best = max(speedups, key=lambda r: r["speedup"])
        verdicts["batching_speedup"] = {"target": TARGETS["batching_speedup"],
                                        "met": best["speedup"] >= TARGETS["batching_speedup"],
                                        "best": {key: best[key] for key in ("index", "rerank", "concurrency", "speedup")}}
    return verdicts


# --------------------------------------------------------------------------------------------
# profile: where a batch's time goes
# --------------------------------------------------------------------------------------------


# The stages of Recommender.recommend_many, by function name (cumulative time of each).
STAGES = {"_plan": "validate + plan requests", "request_batch": "build the tower / ranker batches",
          "encode_users": "user tower forward", "search_rows": "index search + exact filters",
          "_rerank": "DCN re-ranking (its batches included)", "_response": "build the responses"}


def profile_batch(export: Path, args: argparse.Namespace, rerank: bool, repeat: int = 10) -> dict[str, float]:
    """Milliseconds per ``recommend_many`` call over ``--max-batch`` requests, by stage (cProfile,
    ``repeat`` calls after an untimed one); ``total``: the whole call."""
    import cProfile
    import pstats

    import torch

    from trec.serving import Recommender, RecommendRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    recommender = Recommender.load(export, verify=False)
    bodies = request_mix(known_users(export), args.max_batch, args.seed, args.k, args.candidates, rerank)
    requests = [RecommendRequest(**json.loads(body)) for body in bodies]
    recommender.recommend_many(requests)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeat):
        recommender.recommend_many(requests)
    profiler.disable()
    cumulative = {"total": 0.0} | {name: 0.0 for name in STAGES}
    for (_, _, function), (_, _, _, seconds, _) in pstats.Stats(profiler).stats.items():
        if function in STAGES or function == "recommend_many":
            key = "total" if function == "recommend_many" else function
            cumulative[key] = max(cumulative[key], seconds)  # recursion-free: the outermost frame's time
    return {key: round(seconds / repeat * 1000, 2) for key, seconds in cumulative.items()}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    header = (f"{'index':<22} {'request':<16} {'server':<14} {'clients':>7} {'QPS':>8} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'errors':>6} {'vs one':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = f"{r['speedup']:.1f}x" if r.get("speedup") else ""
        lines.append(f"{r['index']:<22} {'re-rank' if r['rerank'] else 'retrieval':<16} {r['mode']:<14} "
                     f"{r['concurrency']:>7} {r['qps']:>8,.0f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                     f"{r['p99_ms']:>8.1f} {r['errors']:>6} {speedup:>7}")
    return "\n".join(lines)


def format_verdicts(verdicts: dict) -> list[str]:
    lines = []
    for name, v in verdicts.items():
        t, b = v["target"], v["best"]
        goal = f">= {t:g}x one at a time" if name == "batching_speedup" else f">= {t['qps']:g} QPS at p99 <= {t['p99_ms']:g} ms"
        got = (f"{b['speedup']:.1f}x ({b['index']}, {'re-rank' if b['rerank'] else 'retrieval'}, {b['concurrency']} clients)"
               if name == "batching_speedup" else f"{b['qps']:,.0f} QPS at p99 {b['p99_ms']:.1f} ms ({b['index']}, "
               f"{b['concurrency']} clients)")
        lines.append(f"target {name}: {goal}: {'met' if v['met'] else 'NOT met'}; best {got}")
    return lines


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TrecError(f"--concurrency: expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise TrecError(f"--concurrency: expected positive client counts, got {text!r}")
    return levels


def check_arguments(args: argparse.Namespace) -> list[int]:
    for name in ("k", "candidates", "users", "max_batch"):
        if getattr(args, name) < 1:
            raise TrecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.seconds > 0 or args.warmup < 0 or args.max_wait_ms < 0:
        raise TrecError("--seconds must be > 0, --warmup and --max-wait-ms >= 0")
    if args.mix is not None and not 0 < args.mix < 1:
        raise TrecError(f"--mix: expected a share of /feedback requests between 0 and 1, got {args.mix:g}")
    from trec.bench.mixed import check_redis_option

    check_redis_option(args.redis)
    return parse_levels(args.concurrency)


def run(args: argparse.Namespace) -> int:
    from trec.bench.index import machine

    levels = check_arguments(args)
    exports = [Path(b) for b in args.bundle] if args.bundle else default_bundles(Path(args.cache), Path(args.ml100k))
    infos = [describe(export) for export in exports]
    print(f"machine: {machine()}; server and load generator (built-in asyncio, {sys.executable}) share it")
    if args.mix is not None:
        return run_mixed(exports, infos, levels, args)
    rows, metrics = [], {}
    for export, info in zip(exports, infos):
        bundle_rows, metrics[info["index"]] = bench_bundle(export, info, levels, args)
        rows += bundle_rows
    rows = add_speedups(rows)
    verdicts = judge(rows)
    print()
    print(format_table(rows))
    print(f"\nk={args.k}, {args.seconds:g} s per row after {args.warmup:g} s warm-up; micro-batched = "
          f"--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}; vs one = QPS over --max-batch 1")
    print("\n".join(format_verdicts(verdicts)))
    profiles = {}
    if not all(v["met"] for v in verdicts.values()):
        print("\nwhere the time goes: the batched servers' /metrics histograms (mean per observation)")
        for index, means in metrics.items():
            for name, (count, mean) in means.items():
                shown = f"{mean * 1000:.2f} ms" if name.split("{")[0].endswith("_seconds") else f"{mean:.1f}"
                print(f"  {index}: {name}: {shown} x {count:,}")
        for rerank in [False] + ([True] if any(i["ranker"] for i in infos) and not args.no_rerank else []):
            export = next(e for e, i in zip(exports, infos) if i["ranker"] or not rerank)
            key = f"{'re-rank' if rerank else 'retrieval'}, {args.max_batch} requests"
            profiles[key] = stages = profile_batch(export, args, rerank)
            print(f"cProfile of recommend_many ({key}, {describe(export)['index']}): {stages['total']:.1f} ms per call: "
                  + ", ".join(f"{STAGES[name]} {stages[name]:.1f}" for name in STAGES if stages[name]))
    if args.json:
        atomic_write_json(Path(args.json), {
            "date": date.today().isoformat(), "machine": machine(), "bundles": infos,
            "settings": settings(args), "targets": TARGETS, "rows": rows, "verdicts": verdicts,
            "metrics": {index: {name: {"count": c, "mean_s": m} for name, (c, m) in means.items()}
                        for index, means in metrics.items()},
            "profiles": profiles})
    return 0


def settings(args: argparse.Namespace) -> dict:
    return {"k": args.k, "candidates": args.candidates, "seconds": args.seconds, "warmup": args.warmup,
            "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
            "workers": args.workers, "users": args.users, "seed": args.seed, "mix": args.mix,
            "load_generator": "built-in asyncio (trec.bench.loadgen)"}


def run_mixed(exports: list[Path], infos: list[dict], levels: list[int], args: argparse.Namespace) -> int:
    """``--mix``: the mixed workload, embedded store against Redis (:mod:`trec.bench.mixed`)."""
    from trec.bench.index import machine
    from trec.bench import mixed

    rows, verdict = mixed.run_mixed(exports, infos, levels, args)
    if args.json:
        atomic_write_json(Path(args.json), {"date": date.today().isoformat(), "machine": machine(), "bundles": infos,
                                            "settings": settings(args) | {"redis": args.redis}, "mixed_rows": rows,
                                            "verdicts": {"redis_store": verdict}})
    return 0
