"""`trec evaluate`: test metrics of a trained run (also run at the end of `trec train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import add_index_search_flags, add_override_flags, add_run_dir_flag, config_overrides, load_index


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ranker_run_dir:
        return run_two_stage(args)
    from trec.distributed import distributed_session
    from trec.errors import TrecError
    from trec.metrics import format_metrics, format_ranking_table
    from trec.evaluation.protocol import excluded_splits
    from trec.models import EvaluationRequest, model_spec
    from trec.runs import check_index_binding, load_trained_run, retriever_of_run, run_config

    cfg = run_config(Path(args.run_dir), config_overrides(args))
    index = load_index(args) if args.index else None
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        loaded = load_trained_run(Path(args.run_dir), ctx, config_overrides(args))
        if not loaded.dataset.has_split(args.split):
            raise TrecError(f"{cfg.data.path}: no '{args.split}' split")
        exclusions = excluded_splits(loaded.dataset, args.split)
        if index is not None:
            retriever_of_run(loaded)
            check_index_binding(index, loaded)
        request = EvaluationRequest(args.split, exclusions, cfg.evaluation, cfg.data, cfg.training.seed, index)
        metrics = model_spec(cfg.model.name).evaluate(loaded.task, loaded.dataset, request, ctx)
        if ctx.is_main:
            run = loaded.run
            run.merge_metrics(metrics | {"evaluated_checkpoint": str(loaded.checkpoint)}, split_prefix(args.split))
            columns = {"model": "", "popularity": "popularity/"} | ({"index": "index/"} if index else {})
            # A ranker's metrics (auc, logloss, ...) have no top-K table.
            print(format_ranking_table(metrics, columns) if any("@" in k for k in metrics) else format_metrics(metrics))
            if index is not None:
                recalls = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("index/ann_recall"))
                print(f"index: {index.index_kind}, {index.num_shards} shards; ANN recall vs exact search: {recalls}")
            print(f"wrote {run.metrics}")
    return 0


def split_prefix(split: str) -> str:
    """Test metrics keep the plain keys (``ndcg@10``); other splits' are prefixed (``val/ndcg@10``)."""
    return "" if split == "test" else f"{split}/"


def run_two_stage(args: argparse.Namespace) -> int:
    """Retrieve with --run-dir, re-rank with --ranker-run-dir, write both rows to the ranker's metrics.json."""
    from trec.distributed import distributed_session
    from trec.errors import TrecError
    from trec.metrics import format_ranking_table
    from trec.runs import RunDir, run_config
    from trec.two_stage import evaluate_two_stage_runs

    index = load_index(args) if args.index else None
    if args.candidates < 1:
        raise TrecError(f"--candidates: expected a positive number, got {args.candidates}")
    ranker_dir = RunDir(Path(args.ranker_run_dir))
    cfg = run_config(ranker_dir.root, config_overrides(args))
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        metrics = evaluate_two_stage_runs(Path(args.run_dir), ranker_dir.root, ctx, args.split, args.candidates,
                                          config_overrides(args), index)
        if args.index:
            metrics["two_stage/index"] = str(Path(args.index).resolve())
        if ctx.is_main:
            ranker_dir.merge_metrics(metrics, split_prefix(args.split))
            print(format_ranking_table(metrics, {"retrieval": "retrieval/", "two_stage": "two_stage/"}))
            print(f"wrote {ranker_dir.metrics}")
    return 0
