"""`trec search`: embed one user with the user tower and search the exported FAISS index."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import add_index_search_flags, add_run_dir_flag, load_index


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search a FAISS index for a user",
        description="Embed --user (a raw user ID of the dataset) with the run's user tower, search the index "
        "and print the top -k items with their titles where the dataset has them.",
    )
    parser.add_argument("--index", required=True, metavar="DIR", help="export directory (trec export --out)")
    add_run_dir_flag(parser)
    parser.add_argument("--user", required=True, metavar="ID", help="raw user ID, as in the source data")
    parser.add_argument("-k", type=int, default=10, help="items to return (default 10)")
    add_index_search_flags(parser)
    parser.add_argument("--include-seen", action="store_true",
                        help="keep items the user already has in the training data")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from trec.distributed import distributed_session
    from trec.errors import TrecError
    from trec.runs import load_trained_run, run_config, two_tower_of
    from trec.trainer import excluded_splits

    if args.k < 1:
        raise TrecError(f"-k: expected a positive number, got {args.k}")
    index = load_index(args)
    cfg = run_config(Path(args.run_dir))
    with distributed_session(cfg.training.seed, cfg.training.device, "WARNING") as ctx:
        loaded = load_trained_run(Path(args.run_dir), ctx)
        dataset = loaded.dataset
        user = dataset.lookup_index("user_id", args.user)
        batch = dataset.build_batch(np.array([user]), np.array([-1]), np.zeros(1, dtype=np.float32),
                                    history_max_len=loaded.cfg.data.history_max_len)
        vector = two_tower_of(loaded).user_embeddings(batch.to(ctx.device)).detach().float().cpu().numpy()
        offsets, seen_items = dataset.user_items(excluded_splits(dataset, "test"))
        seen = set() if args.include_seen else set(seen_items[offsets[user]:offsets[user + 1]].tolist())
        found = index.search(vector, args.k + len(seen))
        titles = dataset.item_titles()
        rows = [(int(i), raw, float(score)) for i, raw, score in
                zip(found.item_indices[0], found.raw_ids[0], found.scores[0]) if i >= 0 and int(i) not in seen]
        print(f"user {args.user}: top {args.k} of {index.num_vectors:,} items ({index.index_kind}, "
              f"{len(seen)} seen items excluded)")
        for rank, (item, raw, score) in enumerate(rows[: args.k], start=1):
            title = f"  {titles[item]}" if titles else ""
            print(f"{rank:>3}. {str(raw):>10}  {score:8.4f}{title}")
    return 0
