"""`trec recommend`: titled recommendations for one user (two-stage)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import add_run_dir_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="titled recommendations for one user (two-stage)",
        description="Retrieve --candidates items for one user with the two-tower run (--run-dir), re-rank them "
        "with the ranker run (--ranker-run-dir) and print the top -k with their titles. Items the user has in "
        "any split of the dataset are never recommended. An unknown user gets the most popular items (a "
        "popularity fallback, labelled as such).",
    )
    add_run_dir_flag(parser)
    parser.add_argument("--ranker-run-dir", metavar="DIR",
                        help="ranker run that re-ranks the candidates (without it: retrieval order)")
    parser.add_argument("--user", required=True, metavar="RAW_ID", help="the user's raw ID, as in the source data")
    parser.add_argument("-k", type=int, default=10, help="recommendations to print (default: 10)")
    parser.add_argument("--candidates", type=int, default=100, metavar="N",
                        help="candidates retrieved before re-ranking (default: 100)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from data_pipeline import layout as L
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.errors import TrecError
    from trec.runs import run_config
    from trec.two_stage import load_run, ranker_of, recommend_for_user

    if args.k < 1 or args.candidates < 1:
        raise TrecError(f"-k ({args.k}) and --candidates ({args.candidates}) must be positive")
    cfg = run_config(Path(args.run_dir))
    dataset = PreparedDataset.open(cfg.data.path)
    titles = dataset.item_titles()
    raw_items = dataset.raw_ids(L.ITEM_ID)

    def title(item: int) -> str:
        return (titles[item] if titles and titles[item] else "") or f"item {raw_items[item]}"

    try:
        user = dataset.lookup_index(L.USER_ID, args.user)
    except TrecError:
        user = None
    if user is None or dataset.user_counts[user] == 0:
        popular = np.argsort(-dataset.item_counts, kind="stable")[: args.k]
        print(f"user {args.user} is unknown (or has no training data): popularity fallback, the {args.k} items "
              "with the most training interactions, not personalised")
        print(f"{'rank':>4}  {'item':>8}  {'train count':>11}  title")
        for rank, item in enumerate(popular, start=1):
            print(f"{rank:>4}  {raw_items[item]!s:>8}  {dataset.item_counts[item]:>11}  {title(item)}")
        return 0

    seen = [split for split in L.SPLITS if dataset.has_split(split)]
    with distributed_session(cfg.training.seed, cfg.training.device, "WARNING") as ctx:
        retriever = load_run(Path(args.run_dir), dataset, ctx)
        score, weight = None, 0.0
        if args.ranker_run_dir:
            ranker = load_run(Path(args.ranker_run_dir), dataset, ctx)
            score, weight = ranker_of(ranker, dataset, ctx), ranker.cfg.model.dcn.retrieval_weight
        found = recommend_for_user(user, retriever, score, dataset, seen, args.k, args.candidates, ctx, weight)
        if ctx.is_main:
            blend = f" + {weight:g} x retrieval score" if weight else ""
            how = (f"two-tower top {args.candidates} re-ranked by the ranker{blend}" if score is not None
                   else "two-tower retrieval order")
            print(f"user {args.user}: {len(found)} recommendations ({how}; items already rated are excluded)")
            print(f"{'rank':>4}  {'item':>8}  {'score':>8}  {'retrieval (#)':>15}  title")
            for rank, rec in enumerate(found, start=1):
                ranker = f"{rec.ranker_score:8.3f}" if rec.ranker_score is not None else f"{'-':>8}"
                retrieved = f"{rec.retrieval_score:7.3f} (#{rec.retrieval_rank})"
                print(f"{rank:>4}  {raw_items[rec.item]!s:>8}  {ranker}  {retrieved:>15}  {title(rec.item)}")
    return 0
