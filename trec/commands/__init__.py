"""One module per `trec` sub-command: its arguments (``register``) and a thin ``run`` into the library.

Every module here keeps heavy imports (torch, torchrec, faiss) inside ``run`` so that
``trec --help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse


def add_config_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The shared `--config FILE` plus `--set KEY=VALUE` / trailing `KEY=VALUE` overrides."""
    parser.add_argument("--config", required=required, metavar="FILE", help="YAML experiment config (configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set optimizer.dense_lr=0.01 (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more dotted-key overrides")


def config_overrides(args: argparse.Namespace) -> list[str]:
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
    if args.nprobe:
        index.nprobe = args.nprobe
    if args.ef_search:
        index.ef_search = args.ef_search
    return index
