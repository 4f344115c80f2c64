"""`trec bench ids`: managed-collision IDs against modulo hashing at the same table size.

Per dataset (ML-100K with the benchmark protocol, and a Zipf synthetic set), one prepare with
``--id-mapping managed`` (so every method trains on the same split and the same raw-ID hashes),
then one single-process ``trec train`` of configs/movielens_two_tower.yaml per method:

- **full**: tables with a row for every ID (zch_size = IDs + 1): no collisions, the reference;
- **modulo**: the baseline, row = hash(raw ID) % rows (``model.managed_collision.remap=modulo``,
  the same as ``--id-mapping hash`` with that many buckets), tables ``--shrink`` times smaller
  than the vocabulary;
- **mch-lfu**, **mch-lru**: torchrec's MCHManagedCollisionModule at the same table sizes.

Collision rate, per table: the share of the IDs seen in training that share their row with
another such ID (modulo: a bucket of two or more; MCH: not resident at the end of training, so
on the reserved row all such IDs share), and the share of test interactions whose ID collides.
NDCG@10 is the run's test evaluation (exclusions: the user's train items, by catalog item).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from trec.bench.quality import trec_cli
from trec.errors import TrecError
from trec.io import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
ML100K = REPO.parent / "shared" / "datasets" / "ml-100k"
CONFIG = "configs/movielens_two_tower.yaml"
DATASETS = ("ml100k", "zipf")
TABLES = ("user_id", "item_id")
_MCH = "model.managed_ids.mch.{}._mch_sorted_raw_ids"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of ml100k,zipf")
    parser.add_argument("--source", default=str(ML100K),
                        help="MovieLens 100K files (default ../shared/datasets/ml-100k)")
    parser.add_argument("--cache", default="data/bench-ids", help="where the datasets are prepared and reused")
    parser.add_argument("--shrink", type=float, default=4.0,
                        help="vocabulary / table rows of the compared methods (default 4: tables 4x smaller)")
    parser.add_argument("--evictions", default="lfu,lru", help="MCH eviction policies to run (default lfu,lru)")
    parser.add_argument("--zipf-users", type=int, default=10_000)
    parser.add_argument("--zipf-items", type=int, default=10_000)
    parser.add_argument("--zipf-interactions", type=int, default=300_000)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of item popularity (default 1.1)")
    parser.add_argument("--zipf-epochs", type=int, default=5, help="training epochs on the Zipf set (default 5)")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. training.epochs=3 (repeatable)")
    parser.add_argument("--runs", metavar="DIR", help="keep the runs here (default: a temporary directory)")


def _prepare(name: str, args: argparse.Namespace) -> Path:
    """The managed dataset ``name`` under --cache, prepared once and reused."""
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.movielens import MovieLensSource
    from data_pipeline.sources.synthetic import SyntheticSource
    from trec.config import IdMapping, PrepareConfig, SyntheticConfig

    if name == "ml100k":
        out = Path(args.cache) / "ml100k-managed"
        options = PrepareConfig(test_fraction=0.25, val_fraction=0.1, seed=42, id_mapping=IdMapping.managed)
        source = lambda: MovieLensSource(args.source)  # noqa: E731
    else:
        synthetic = SyntheticConfig(users=args.zipf_users, items=args.zipf_items, interactions=args.zipf_interactions,
                                    zipf=args.zipf)
        out = Path(args.cache) / f"zipf-{synthetic.users}-{synthetic.items}-{synthetic.interactions}-{synthetic.zipf}"
        options = PrepareConfig(test_fraction=0.25, val_fraction=0.1, seed=42, id_mapping=IdMapping.managed,
                                history_max_len=50, synthetic=synthetic)
        source = lambda: SyntheticSource(synthetic, seed=options.seed)  # noqa: E731
    if not (out / "manifest.json").is_file():
        prepare_dataset(source(), out, options, overwrite=True)
    return out


def _methods(dataset, args: argparse.Namespace) -> dict[str, tuple[dict[str, int], list[str]]]:
    """method → (table rows per ID feature, config overrides)."""
    vocab = {"user_id": dataset.num_users, "item_id": dataset.num_items}
    small = {table: max(2, math.ceil(size / args.shrink)) for table, size in vocab.items()}
    methods = {"full": ({table: size + 1 for table, size in vocab.items()}, ["model.managed_collision.remap=mch"]),
               "modulo": (small, ["model.managed_collision.remap=modulo"])}
    for eviction in [e.strip() for e in args.evictions.split(",") if e.strip()]:
        if eviction not in ("lfu", "lru"):
            raise TrecError(f"--evictions: unknown policy '{eviction}'; choose from lfu, lru")
        methods[f"mch-{eviction}"] = (small, ["model.managed_collision.remap=mch",
                                             f"model.managed_collision.eviction={eviction}"])
    return {name: (rows, overrides + [f"model.tables.{t}.zch_size={n}" for t, n in rows.items()])
            for name, (rows, overrides) in methods.items()}


def _train(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    trec_cli("train", "--config", CONFIG, "--data", data, "--run-dir", run_dir, "training.validation=split", *overrides)
    return json.loads((run_dir / "metrics.json").read_text())


def _resident(run_dir: Path, table: str, rows: int) -> np.ndarray:
    """The managed IDs holding a row of ``table`` in the run's inference checkpoint."""
    from trec.checkpoint import checkpoint_for_inference, load_checkpoint

    key = _MCH.format(table)
    state = {"model": {key: torch.empty(rows, dtype=torch.int64)}}
    load_checkpoint(state, checkpoint_for_inference(run_dir))
    return state["model"][key].numpy()


def _collisions(dataset, run_dir: Path, method: str, rows: dict[str, int]) -> dict[str, float]:
    """Per table: share of train IDs that collide, and of test interactions whose ID collides."""
    test = dataset.read_split("test")
    trained = {"user_id": dataset.user_counts > 0, "item_id": dataset.item_train_rows > 0}
    out = {}
    for table in TABLES:
        spec = dataset.feature(table)
        ids = dataset.model_ids(spec, np.arange(spec.cardinality, dtype=np.int64))
        seen = trained[table]
        if method == "modulo":
            row = ids % rows[table]
            shared = np.bincount(row[seen], minlength=rows[table])[row] > 1
        else:
            shared = ~np.isin(ids, _resident(run_dir, table, rows[table]))
        out[f"{table}/ids_collided"] = float(shared[seen].mean())
        out[f"{table}/test_rows_collided"] = float(shared[test[table].to_numpy()].mean())
    return out


def _bench_dataset(name: str, args: argparse.Namespace, runs: Path) -> list[dict]:
    from trec.data import PreparedDataset

    data = _prepare(name, args)
    dataset = PreparedDataset.open(data)
    extra = list(args.set_overrides) + ([f"training.epochs={args.zipf_epochs}"] if name == "zipf" else [])
    results = []
    for method, (rows, overrides) in _methods(dataset, args).items():
        run_dir = runs / f"{name}-{method}"
        print(f"[{name}] training {method} (rows {rows['user_id']}/{rows['item_id']})", file=sys.stderr, flush=True)
        metrics = _train(data, run_dir, overrides + extra)
        results.append({"dataset": name, "method": method, "users": dataset.num_users, "items": dataset.num_items,
                        "user_rows": rows["user_id"], "item_rows": rows["item_id"],
                        "ndcg@10": metrics["ndcg@10"], "train_seconds": metrics.get("train_seconds"),
                        **_collisions(dataset, run_dir, method, rows)})
    return results


def format_table(results: list[dict]) -> str:
    header = (f"{'dataset':<8} {'method':<8} {'rows user/item':>15} {'users coll.':>11} {'items coll.':>11} "
              f"{'test rows coll. (item)':>22} {'NDCG@10':>8} {'train s':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['dataset']:<8} {r['method']:<8} {r['user_rows']:>7}/{r['item_rows']:<7} "
                     f"{r['user_id/ids_collided']:>10.1%} {r['item_id/ids_collided']:>11.1%} "
                     f"{r['item_id/test_rows_collided']:>22.1%} {r['ndcg@10']:>8.4f} {r['train_seconds'] or 0:>8.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if not names or unknown:
        raise TrecError(f"--datasets: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(DATASETS)}")
    if args.shrink < 1:
        raise TrecError(f"--shrink must be >= 1, got {args.shrink}")
    with tempfile.TemporaryDirectory(prefix="trec-bench-ids-") as scratch:
        runs = Path(args.runs) if args.runs else Path(scratch)
        results = [row for name in names for row in _bench_dataset(name, args, runs)]
    print(format_table(results))
    from trec.bench.index import machine

    print(f"\n{machine()}, {datetime.date.today().isoformat()}; collisions: share of the IDs seen in training "
          "that share their row, and of test interactions whose item shares one")
    if args.json:
        atomic_write_json(Path(args.json), {"results": results, "shrink": args.shrink})
    return 0
