"""`trec data`: prepare datasets (`trec data prepare SOURCE ...`) and inspect them (`trec data info DIR`).

Every option of `prepare` is also a config key under `data.prepare` (flags win over the
config file; see :class:`trec.config.PrepareConfig`).
"""

from __future__ import annotations

import argparse
import json

from trec.commands import add_config_flags, config_overrides

_SOURCES = ("movielens", "parquet", "csv", "synthetic")


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# (flag, config key under data.prepare, type, help). None defaults: only given flags override.
_OPTIONS = (
    ("--split", "split", str, "stratified (default), temporal or leave-last-n"),
    ("--test-fraction", "test_fraction", float, "share held out for test (default 0.25)"),
    ("--val-fraction", "val_fraction", float, "per-user share of the train part moved to val (default 0)"),
    ("--last-n", "last_n", int, "leave-last-n: interactions per user held out (default 1)"),
    ("--seed", "seed", int, "seed of the split and of the synthetic generator (default 42)"),
    ("--id-mapping", "id_mapping", str, "vocab (default), hash or managed, for user_id and item_id"),
    ("--hash-buckets", "hash_buckets", int, "buckets of hashed user_id/item_id (default 2^20)"),
    ("--zch-size", "zch_size", int, "managed: rows of the user_id/item_id tables (default 2^20)"),
    ("--hash-features", "hash_features", _csv_list, "side/context features to hash, NAME:BUCKETS,..."),
    ("--min-count", "min_count", int, "drop users/items seen fewer times; rarer feature values → OOV"),
    ("--duplicates", "duplicates", str, "keep (default) or drop repeated (user, item) pairs"),
    ("--history-max-len", "history_max_len", int, "train items kept per user history (default 200; 0 = none)"),
    ("--rows-per-shard", "rows_per_shard", int, "rows per split shard (default 1,000,000)"),
    ("--user-col", "columns.user", str, "parquet/csv: user ID column (default user_id)"),
    ("--item-col", "columns.item", str, "parquet/csv: item ID column (default item_id)"),
    ("--time-col", "columns.time", str, "parquet/csv: time column (default timestamp; '' = none)"),
    ("--rating-col", "columns.rating", str, "parquet/csv: rating column (optional)"),
    ("--label-col", "columns.label", str, "parquet/csv: label column in [0, 1] (optional)"),
    ("--user-features", "columns.user_features", _csv_list, "categorical user columns a,b"),
    ("--user-multi-hot-features", "columns.user_multi_hot_features", _csv_list, "multi-valued user columns"),
    ("--user-numeric-features", "columns.user_numeric_features", _csv_list, "numeric user columns"),
    ("--item-features", "columns.item_features", _csv_list, "categorical item columns"),
    ("--item-multi-hot-features", "columns.item_multi_hot_features", _csv_list, "multi-valued item columns"),
    ("--item-numeric-features", "columns.item_numeric_features", _csv_list, "numeric item columns"),
    ("--item-title-col", "columns.item_title", str, "display title of items"),
    ("--context-features", "columns.context_features", _csv_list, "categorical columns of the interaction"),
    ("--multi-hot-separator", "columns.multi_hot_separator", str, "separator of multi-valued text (default '|')"),
    ("--delimiter", "columns.csv_delimiter", str, "csv: field delimiter (default ',')"),
    ("--id-type", "columns.id_type", str, "csv: auto (default), int or string IDs"),
    ("--users", "synthetic.users", int, "synthetic: users (default 100,000)"),
    ("--items", "synthetic.items", int, "synthetic: items (default 20,000)"),
    ("--interactions", "synthetic.interactions", int, "synthetic: interactions (default 1,000,000)"),
    ("--side-features", "synthetic.side_features", int, "synthetic: side features (default 4)"),
    ("--zipf", "synthetic.zipf", float, "synthetic: popularity exponent (default 1.1)"),
    ("--topics", "synthetic.topics", int, "synthetic: latent topics (default 32)"),
)

_CHOICES = {
    "split": ("stratified", "temporal", "leave-last-n"),
    "id_mapping": ("vocab", "hash", "managed"),
    "duplicates": ("keep", "drop"),
    "columns.id_type": ("auto", "int", "string"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare datasets (trec data prepare SOURCE ...), inspect them")
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare",
        help="raw interactions → validated, ID-mapped, split Parquet dataset",
        description="Prepare a dataset: movielens --source DIR | parquet --source PATH | csv --source PATH | "
                    "synthetic. Options are also config keys under data.prepare.",
    )
    prepare.add_argument("source_kind", choices=_SOURCES, metavar="SOURCE", help=" | ".join(_SOURCES))
    prepare.add_argument("--source", metavar="PATH", help="input directory, file or glob (not for synthetic)")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    prepare.add_argument("--quiet", action="store_true", help="print only the summary line")
    for flag, key, kind, help_text in _OPTIONS:
        prepare.add_argument(flag, dest=_dest(key), type=kind, default=None, help=help_text,
                             choices=_CHOICES.get(key), metavar=flag.lstrip("-").replace("-", "_").upper())
    add_config_flags(prepare)
    prepare.set_defaults(func=run_prepare)

    info = actions.add_parser("info", help="summary of a prepared dataset (counts, features, files)")
    info.add_argument("path", metavar="DIR", help="prepared dataset")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256")
    info.add_argument("--json", action="store_true", help="print the manifest")
    info.set_defaults(func=run_info)


def _dest(key: str) -> str:
    return "opt_" + key.replace(".", "__")


def _prepare_options(args: argparse.Namespace):
    """data.prepare from --config / --set, then the flags given on the command line."""
    from trec.models import load_config

    overrides = config_overrides(args)
    for flag, key, _, _ in _OPTIONS:
        value = getattr(args, _dest(key))
        if value is not None:
            overrides.append(f"data.prepare.{key}={json.dumps(value)}")
    return load_config(args.config, overrides).data.prepare


def run_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources import build_source

    options = _prepare_options(args)
    source = build_source(args.source_kind, args.source, options)
    log = (lambda message: None) if args.quiet else print
    manifest = prepare_dataset(source, args.out, options, overwrite=args.overwrite, log=log)
    counts = ", ".join(f"{name} {rows}" for name, rows in manifest["counts"].items())
    print(f"{args.out}: {manifest['num_users']} users, {manifest['num_items']} items, "
          f"{manifest['num_interactions']} interactions ({counts})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from trec.data import PreparedDataset

    dataset = PreparedDataset.open(args.path, verify=args.verify)
    if args.json:
        print(json.dumps(dataset.manifest, indent=2, sort_keys=True))
        return 0
    print(dataset.summary())
    if args.verify:
        print(f"checksums: {len(dataset.manifest['files'])} files ok")
    return 0
