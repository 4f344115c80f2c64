"""`trec search`: embed one user with the user tower and search the exported FAISS index."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import (
    add_index_search_flags,
    add_json_flag,
    add_override_flags,
    add_run_dir_flag,
    config_overrides,
    describe_exclusions,
    item_names,
    load_index,
    print_json,
    print_popularity_fallback,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search a FAISS index for a user",
        description="Embed --user (a raw user ID of the dataset) with the run's user tower, search the index "
        "and print the top -k items with their titles where the dataset has them. Items the user has in any "
        "split of the dataset are left out (--include-seen keeps them); an unknown user (or one with no training "
        "data) gets the labelled popularity fallback. trec recommend treats users the same way.",
    )
    parser.add_argument("--index", required=True, metavar="DIR", help="export directory (trec export --out)")
    add_run_dir_flag(parser)
    parser.add_argument("--user", required=True, metavar="ID", help="raw user ID, as in the source data")
    parser.add_argument("-k", type=int, default=10, help="items to return (default 10)")
    add_index_search_flags(parser)
    parser.add_argument("--include-seen", action="store_true",
                        help="keep items the user already has in the dataset (any split)")
    add_override_flags(parser, "override a value of the run's config, e.g. --set training.device=cpu")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from trec.data import PreparedDataset, pair_key
    from trec.distributed import distributed_session
    from trec.evaluation.served import check_k, serve_user
    from trec.evaluation.topk import index_topk
    from trec.runs import check_index_binding, check_run_dataset, load_trained_run, retriever_of_run, run_config

    index = load_index(args)
    check_k(args.k, index.num_vectors)
    cfg = run_config(Path(args.run_dir), config_overrides(args))
    dataset = PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
    check_run_dataset(Path(args.run_dir), dataset)
    user = serve_user(dataset, args.user, args.include_seen)
    if user.index is None:
        print_popularity_fallback(dataset, user, args.k, args.json)
        return 0
    raw_items, titles = item_names(dataset)
    with distributed_session(cfg.training.seed, cfg.training.device, "WARNING") as ctx:
        loaded = load_trained_run(Path(args.run_dir), ctx, config_overrides(args), dataset)
        check_index_binding(index, loaded)
        batch = dataset.build_batch(np.array([user.index]), np.array([-1]), np.zeros(1, dtype=np.float32),
                                    history_max_len=loaded.cfg.data.history_max_len)
        vector = retriever_of_run(loaded).encode_users(batch.to(ctx.device)).detach().float().cpu()  # 1 X D
        # The seen items' keys in the one query row (row 0).
        excluded = torch.as_tensor(pair_key(0, user.seen, dataset.num_items)) if len(user.seen) else None
        items, scores = index_topk(index, dataset.num_items)(vector, excluded, args.k)
        rows = [(int(i), float(s)) for i, s in zip(items[0].tolist(), scores[0].tolist()) if i >= 0]
    if args.json:
        print_json({"user": user.raw, "index": {"kind": index.index_kind, "num_vectors": index.num_vectors},
                    "excluded_splits": list(user.exclude_splits), "excluded_items": len(user.seen),
                    "items": [{"rank": rank, "item": raw_items[item], "score": score, "title": titles[item]}
                              for rank, (item, score) in enumerate(rows, start=1)]})
        return 0
    print(f"user {args.user}: top {len(rows)} of {index.num_vectors:,} items ({index.index_kind}, "
          f"{describe_exclusions(user)})")
    for rank, (item, score) in enumerate(rows, start=1):
        print(f"{rank:>3}. {raw_items[item]:>10}  {score:8.4f}  {titles[item]}")
    return 0
