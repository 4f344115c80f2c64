"""One module per `trec` sub-command: its arguments (``register``) and a thin ``run`` into the library.

Every module here keeps heavy imports (torch, torchrec, faiss) inside ``run`` so that
``trec --help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable


def defer_arguments(parser: argparse.ArgumentParser, add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Run ``add_arguments(parser)`` only once this sub-command is chosen on the command line.

    argparse hands a chosen sub-command's words to that parser's ``parse_known_args``; adding the arguments
    there means the module that defines them (and what it imports at the top: torch, faiss) loads for that
    command only, never for ``trec --help`` or another command."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        parser.parse_known_args = parse  # once: the arguments are in place from now on
        add_arguments(parser)
        return parse(args, namespace)

    parser.parse_known_args = parse_known_args


def add_config_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The shared `--config FILE` plus `--set KEY=VALUE` / trailing `KEY=VALUE` overrides."""
    parser.add_argument("--config", required=required, metavar="FILE",
                        help="YAML experiment config: a file, or the name of one trec ships (e.g. movielens_two_tower)")
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
    from trec.api import open_index

    return open_index(args.index, args.nprobe, args.ef_search)


def is_main_process() -> bool:
    """Rank 0, or a plain process: the one that prints a command's result (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON document on stdout instead of text")


def print_json(document: dict) -> None:
    """``document`` as one JSON document on stdout; NaN and infinities (not JSON) become null."""
    print(json.dumps(_plain(document), indent=2))


def _plain(value):
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def item_names(dataset) -> tuple[list[str], list[str]]:
    """(printable raw item IDs, titles) by item index; a title falls back to ``item RAW``.

    Works on hash-mapped datasets too (see :meth:`trec.data.PreparedDataset.id_labels`)."""
    raw = dataset.id_labels("item_id")
    titles = dataset.item_titles() or [""] * len(raw)
    return raw, [title or f"item {raw[item]}" for item, title in enumerate(titles)]


def popularity_fallback(dataset, user, k: int) -> list[dict]:
    """The list `trec search` and `trec recommend` give a user they cannot personalise (``user``: a
    :class:`trec.evaluation.served.ServedUser` whose ``index`` is None): the ``k`` items with the most
    training interactions that the user has not seen, as ``{rank, item, positives, title}`` rows."""
    from trec.evaluation.served import popular_items, popularity_order

    popular = popular_items(popularity_order(dataset.item_counts), k, user.seen)
    raw, titles = item_names(dataset)
    return [{"rank": rank, "item": raw[item], "positives": int(dataset.item_counts[item]), "title": titles[item]}
            for rank, item in enumerate(popular.tolist(), start=1)]


def print_popularity_fallback(dataset, user, k: int, as_json: bool = False) -> None:
    """Print :func:`popularity_fallback` as a labelled table, or as JSON (``fallback: popularity``)."""
    rows = popularity_fallback(dataset, user, k)
    if as_json:
        print_json({"user": user.raw, "fallback": "popularity", "items": rows})
        return
    print(f"user {user.raw} is unknown (or has no positive training row): popularity fallback, the {len(rows)} items "
          "with the most training interactions, not personalised")
    print(f"{'rank':>4}  {'item':>8}  {'positives':>11}  title")
    for row in rows:
        print(f"{row['rank']:>4}  {row['item']:>8}  {row['positives']:>11}  {row['title']}")


def describe_exclusions(user) -> str:
    """'12 seen items excluded (train/test)': what a served user's list leaves out."""
    if not user.exclude_splits:
        return "seen items kept (--include-seen)"
    return f"{len(user.seen)} seen items excluded ({'/'.join(user.exclude_splits)})"
