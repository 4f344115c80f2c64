"""One module per `trec` sub-command: its arguments (``register``) and a thin ``run`` into the library.

Every module here keeps heavy imports (torch, torchrec, faiss) inside ``run`` so that
``trec --help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse


def add_config_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The shared `--config FILE` plus `--set KEY=VALUE` / trailing `KEY=VALUE` overrides."""
    parser.add_argument("--config", required=required, metavar="FILE", help="YAML experiment config (configs/*.yaml)")
    add_override_flags(parser, "override a config value by dotted key, e.g. --set optimizer.dense_lr=0.01")


def add_override_flags(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE` (repeatable) and trailing `KEY=VALUE` arguments: every command that reads a
    config takes both, in that order of precedence (trailing ones win); see :func:`config_overrides`."""
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"{help_text} (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more dotted-key overrides, like --set")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set values, then the trailing ones (later overrides win)."""
    return list(args.set_overrides) + list(args.overrides)


def add_data_flag(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", required=required, metavar="DIR", help="prepared dataset (trec data prepare --out)")


def add_run_dir_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--run-dir",
        required=required,
        metavar="DIR",
        help="training run directory (config.yaml, checkpoints/, tb/, metrics.json)",
    )


def add_index_search_flags(parser: argparse.ArgumentParser) -> None:
    """--nprobe / --ef-search: how hard a FAISS export is searched (see :func:`load_index`)."""
    parser.add_argument("--nprobe", type=int, help="IVF lists visited per query (default: the export's)")
    parser.add_argument("--ef-search", type=int, help="HNSW candidate list size (default: the export's)")


def load_index(args: argparse.Namespace):
    """The --index export as a ShardedIndex, with --nprobe / --ef-search applied."""
    from trec.export import ShardedIndex

    index = ShardedIndex.load(args.index)
    # `is not None`: 0 and negatives reach the setters, which refuse them (0 is not "the default").
    if args.nprobe is not None:
        index.nprobe = args.nprobe
    if args.ef_search is not None:
        index.ef_search = args.ef_search
    return index


def item_names(dataset) -> tuple[list[str], list[str]]:
    """(printable raw item IDs, titles) by item index; a title falls back to ``item RAW``.

    Works on hash-mapped datasets too (see :meth:`trec.data.PreparedDataset.id_labels`)."""
    raw = dataset.id_labels("item_id")
    titles = dataset.item_titles() or [""] * len(raw)
    return raw, [title or f"item {raw[item]}" for item, title in enumerate(titles)]


def print_popularity_fallback(dataset, user, k: int) -> None:
    """What `trec search` and `trec recommend` print for a user they cannot personalise
    (``user``: a :class:`trec.evaluation.served.ServedUser` whose ``index`` is None)."""
    from trec.evaluation.served import popular_items, popularity_order

    popular = popular_items(popularity_order(dataset.item_counts), k, user.seen)
    raw, titles = item_names(dataset)
    print(f"user {user.raw} is unknown (or has no positive training row): popularity fallback, the {len(popular)} items "
          "with the most training interactions, not personalised")
    print(f"{'rank':>4}  {'item':>8}  {'positives':>11}  title")
    for rank, item in enumerate(popular.tolist(), start=1):
        print(f"{rank:>4}  {raw[item]:>8}  {dataset.item_counts[item]:>11}  {titles[item]}")


def describe_exclusions(user) -> str:
    """'12 seen items excluded (train/test)': what a served user's list leaves out."""
    if not user.exclude_splits:
        return "seen items kept (--include-seen)"
    return f"{len(user.seen)} seen items excluded ({'/'.join(user.exclude_splits)})"
