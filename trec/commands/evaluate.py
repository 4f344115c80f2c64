"""`trec evaluate`: test metrics of a trained run (also run at the end of `trec train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import (
    add_index_search_flags,
    add_json_flag,
    add_override_flags,
    add_run_dir_flag,
    config_overrides,
    is_main_process,
    load_index,
    print_json,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a run (full-catalog top-K, ranker metrics, FAISS index)",
        description="Evaluate the run's best (or newest) checkpoint on the test split and update RUN/metrics.json.",
    )
    add_run_dir_flag(parser)
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    add_override_flags(parser, "override a value of the run's config, e.g. --set evaluation.ks=[10,50]")
    parser.add_argument("--index", metavar="DIR",
                        help="also rank through this FAISS export of the run (trec export --out): index/... metrics "
                        "beside the exact ones, and the index's ANN recall@K against exact search; with "
                        "--ranker-run-dir, the candidates are retrieved through the index")
    add_index_search_flags(parser)  # with --index
    parser.add_argument("--ranker-run-dir", metavar="DIR",
                        help="two-stage: --run-dir (a two-tower) retrieves --candidates items per user, this ranker "
                        "run re-ranks them; retrieval-only and two-stage metrics go side by side into DIR/metrics.json "
                        "(retrieval/..., two_stage/...); --set then applies to the ranker's config")
    parser.add_argument("--candidates", type=int, default=100, metavar="N",
                        help="two-stage: candidates retrieved per user (default: 100)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.api import evaluate
    from trec.runs import RunDir

    index = load_index(args) if args.index else None
    metrics = evaluate(args.run_dir, args.split, index=index, ranker_run_dir=args.ranker_run_dir,
                       candidates=args.candidates, overrides=config_overrides(args))
    written = RunDir(Path(args.ranker_run_dir or args.run_dir)).metrics
    if is_main_process() and args.json:
        print_json({"run_dir": args.run_dir, "ranker_run_dir": args.ranker_run_dir, "split": args.split,
                    "index": args.index, "metrics": metrics, "metrics_file": str(written)})
    elif is_main_process():
        print_tables(metrics, index, two_stage=bool(args.ranker_run_dir))
        print(f"wrote {written}")
    return 0


def print_tables(metrics: dict, index, two_stage: bool) -> None:
    """The metrics side by side: model, popularity (and index) columns, or retrieval and two-stage ones."""
    from trec.metrics import format_metrics, format_ranking_table

    if two_stage:
        print(format_ranking_table(metrics, {"retrieval": "retrieval/", "two_stage": "two_stage/"}))
        return
    columns = {"model": "", "popularity": "popularity/"} | ({"index": "index/"} if index else {})
    # A ranker's metrics (auc, logloss, ...) have no top-K table.
    print(format_ranking_table(metrics, columns) if any("@" in k for k in metrics) else format_metrics(metrics))
    if index is not None:
        recalls = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("index/ann_recall"))
        print(f"index: {index.index_kind}, {index.num_shards} shards; ANN recall vs exact search: {recalls}")
