"""`trec export`: encode a trained two-tower run's items (and users) into a sharded FAISS index, and
write the servable bundle (with a ranker run when given)."""

from __future__ import annotations

import argparse

from trec.commands import add_override_flags, add_run_dir_flag, config_overrides, is_main_process


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export embeddings into a sharded FAISS index",
        description="Load the run's best (or newest) checkpoint into the sharded model (any world size); each "
        "rank encodes a disjoint slice of the catalog with the item tower; the vectors go to "
        "OUT/embeddings/ and a sharded FAISS index to OUT/index/, with OUT/manifest.json; OUT/bundle/ holds what "
        "`trec serve` loads (unsharded weights, request-time tables, checksums). Index options are "
        "the config's export section, e.g. --set export.index=ivf_flat --set export.nlist=256. Run it under "
        "torchrun/torchx for several ranks.",
    )
    add_run_dir_flag(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="export directory (written atomically)")
    parser.add_argument("--users", action="store_true", help="also export user embeddings (users-part-R.parquet)")
    parser.add_argument("--ranker-run-dir", metavar="RANKER", default=None,
                        help="also bundle this ranker run (a dcn run trained on the same dataset) for re-ranking")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    add_override_flags(parser, "override a value of the run's config, e.g. --set export.index=hnsw")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trec.export.encode import export_trained_run

    manifest = export_trained_run(args.run_dir, args.out, users=True if args.users else None,
                                  ranker_run_dir=args.ranker_run_dir, overwrite=args.overwrite,
                                  overrides=config_overrides(args))
    if is_main_process():
        print(f"exported {manifest['num_vectors']:,} items ({manifest['dimension']}-d, {manifest['factory']}, "
              f"{manifest['num_shards']} shards) from {manifest['source']['checkpoint']} to {args.out}")
    return 0
