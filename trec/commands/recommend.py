"""`trec recommend`: titled recommendations for one user (two-stage)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import (
    add_json_flag,
    add_override_flags,
    add_run_dir_flag,
    config_overrides,
    describe_exclusions,
    item_names,
    print_json,
    print_popularity_fallback,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="titled recommendations for one user (two-stage)",
        description="Retrieve --candidates items for one user with the two-tower run (--run-dir), re-rank them "
        "with the ranker run (--ranker-run-dir) and print the top -k with their titles. Items the user has in "
        "any split of the dataset are never recommended (--include-seen keeps them). An unknown user (or one "
        "with no training data) gets the most popular items (a popularity fallback, labelled as such). "
        "trec search treats users the same way.",
    )
    add_run_dir_flag(parser)
    parser.add_argument("--ranker-run-dir", metavar="DIR",
                        help="ranker run that re-ranks the candidates (without it: retrieval order)")
    parser.add_argument("--user", required=True, metavar="RAW_ID", help="the user's raw ID, as in the source data")
    parser.add_argument("-k", type=int, default=10, help="recommendations to print (default: 10)")
    parser.add_argument("--candidates", type=int, default=100, metavar="N",
                        help="candidates retrieved before re-ranking (default: 100; at most the catalog)")
    parser.add_argument("--include-seen", action="store_true",
                        help="also recommend items the user already has in the dataset (any split)")
    add_override_flags(parser, "override a value of both runs' configs, e.g. --set training.device=cpu")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.errors import TrecError
    from trec.runs import check_run_dataset, run_config
    from trec.evaluation.served import check_k, serve_user
    from trec.two_stage import load_run, ranker_of, recommend_for_user

    if args.candidates < 1:
        raise TrecError(f"--candidates: expected a positive number, got {args.candidates}")
    overrides = config_overrides(args)
    cfg = run_config(Path(args.run_dir), overrides)
    dataset = PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
    check_run_dataset(Path(args.run_dir), dataset)
    check_k(args.k, dataset.num_items)
    user = serve_user(dataset, args.user, args.include_seen)
    if user.index is None:
        print_popularity_fallback(dataset, user, args.k, args.json)
        return 0
    raw_items, titles = item_names(dataset)
    candidates = min(args.candidates, dataset.num_items)
    with distributed_session(cfg.training.seed, cfg.training.device, "WARNING") as ctx:
        retriever = load_run(Path(args.run_dir), dataset, ctx, overrides)
        score, weight = None, 0.0
        if args.ranker_run_dir:
            ranker = load_run(Path(args.ranker_run_dir), dataset, ctx, overrides)
            score, weight = ranker_of(ranker, dataset, ctx), ranker.cfg.model.dcn.retrieval_weight
        found = recommend_for_user(user.index, retriever, score, dataset, user.exclude_splits, args.k, candidates,
                                   ctx, weight)
        if ctx.is_main and args.json:
            print_json({"user": user.raw, "reranked": score is not None, "retrieval_weight": weight,
                        "candidates": candidates, "excluded_splits": list(user.exclude_splits),
                        "excluded_items": len(user.seen),
                        "items": [{"rank": rank, "item": raw_items[rec.item], "score": rec.ranker_score,
                                   "retrieval_score": rec.retrieval_score, "retrieval_rank": rec.retrieval_rank,
                                   "title": titles[rec.item]} for rank, rec in enumerate(found, start=1)]})
        elif ctx.is_main:
            blend = f" + {weight:g} x retrieval score" if weight else ""
            how = (f"two-tower top {candidates} re-ranked by the ranker{blend}" if score is not None
                   else "two-tower retrieval order")
            print(f"user {args.user}: {len(found)} recommendations ({how}; {describe_exclusions(user)})")
            print(f"{'rank':>4}  {'item':>8}  {'score':>8}  {'retrieval (#)':>15}  title")
            for rank, rec in enumerate(found, start=1):
                ranker = f"{rec.ranker_score:8.3f}" if rec.ranker_score is not None else f"{'-':>8}"
                retrieved = f"{rec.retrieval_score:7.3f} (#{rec.retrieval_rank})"
                print(f"{rank:>4}  {raw_items[rec.item]:>8}  {ranker}  {retrieved:>15}  {titles[rec.item]}")
    return 0
