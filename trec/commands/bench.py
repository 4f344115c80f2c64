"""`trec bench {data,train,index,serve,quality}`: benchmarks that print ratios against a baseline run alongside.

Each benchmark lives in :mod:`trec.bench` (``add_arguments`` + ``run``); this module only wires
them under ``trec bench``. Every one accepts ``--json PATH`` to write its figures.
"""

from __future__ import annotations

import argparse
import importlib

from trec.commands import defer_arguments

_BENCHMARKS = {
    "data": "reader throughput (samples/s, MB/s into ready Batches) beside the training step rate",
    "train": "sharded two-tower training samples/s vs plain-PyTorch embedding baselines",
    "index": "FAISS index kinds: build time, queries/s and recall@10 vs exact search",
    "serve": "trec serve under load: QPS and p50/p95/p99, micro-batched vs one request at a time",
    "quality": "test precision/recall/NDCG/MAP@10 and coverage of popularity, EASE, mf, two-tower, two-stage",
    "ids": "managed-collision IDs (torchrec MCH, LFU/LRU) vs modulo hashing: collision rate and NDCG@10",
    "scale": "samples/s, s/step and peak RSS per rank as table rows, batch and ranks grow (fp32/fp16 tables)",
    "prepare": "`trec data prepare synthetic` wall time and peak RSS as interactions grow, projected to 1B",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=f"benchmarks ({', '.join(_BENCHMARKS)})")
    actions = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, help_text in _BENCHMARKS.items():
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
        sub.set_defaults(func=_runner(name))
        # Each benchmark module imports torch or faiss at the top: loaded only when its benchmark is chosen.
        defer_arguments(sub, lambda parser, name=name: _module(name).add_arguments(parser))


def _module(name: str):
    return importlib.import_module(f"trec.bench.{name}")


def _runner(name: str):
    def run(args: argparse.Namespace) -> int:
        return _module(name).run(args)

    return run
