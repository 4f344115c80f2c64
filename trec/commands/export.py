"""`trec export`: encode a trained two-tower run's items (and users) into a sharded FAISS index, and
write the servable bundle (with a ranker run when given)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trec.commands import add_override_flags, add_run_dir_flag, config_overrides


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
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.export.encode import bundled_run, export_run
    from trec.runs import load_trained_run, run_config

    cfg = run_config(Path(args.run_dir), config_overrides(args))
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        dataset = PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
        # Checked before any model is loaded: a ranker of another dataset is refused in one line.
        ranker = bundled_run(Path(args.ranker_run_dir), dataset) if args.ranker_run_dir else None
        loaded = load_trained_run(Path(args.run_dir), ctx, config_overrides(args), dataset)
        manifest = export_run(loaded, Path(args.out), ctx, users=args.users or cfg.export.users,
                              overwrite=args.overwrite, ranker=ranker)
        if ctx.is_main:
            print(f"exported {manifest['num_vectors']:,} items ({manifest['dimension']}-d, {manifest['factory']}, "
                  f"{manifest['num_shards']} shards) from {loaded.checkpoint} to {args.out}")
    return 0
