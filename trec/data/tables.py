"""Request-time tables: a copy of a prepared dataset without its splits, for serving.

Serving needs what a request is built from (user and item features, user histories, ID
mappings), never the interaction shards. :func:`write_request_tables` writes such a copy::

    TABLES/manifest.json          the dataset's manifest; "files" lists only what is here, "serving": true
    TABLES/features/*.parquet     copied (users, items, user history)
    TABLES/mappings/*.parquet     copied
    TABLES/seen.parquet           one row per user index: the items of every split (what exclude_seen removes)
                                  and its count of positive training rows (whom the tower personalises)
    TABLES/popularity.parquet     one row per item index: positive training rows (PreparedDataset.item_counts)

:class:`~trec.data.PreparedDataset` opens it like any prepared dataset; its ``item_counts``
come from popularity.parquet (there are no training rows to count).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import layout as L
from trec.data.checks import check_indices, parquet_errors
from trec.data.csr import Csr
from trec.errors import TrecError
from trec.io import atomic_write_json, sha256_file

SEEN_FILE = "seen.parquet"
POPULARITY_FILE = "popularity.parquet"
POSITIVE_TRAIN = "positive_train"
SERVING = "serving"
"""Manifest flag of request-time tables (no split files; popularity read from POPULARITY_FILE)."""


def is_split_file(relative: str, manifest: dict) -> bool:
    """An interaction shard (``train/part-*.parquet`` ...): what request-time tables leave out."""
    splits = set(L.SPLITS) | set(manifest.get("counts", {}))
    return relative.split("/", 1)[0] in splits


def write_request_tables(dataset, out: Path) -> dict:
    """Write ``dataset``'s request-time tables into the new directory ``out``; returns its manifest.

    ``dataset``: a :class:`~trec.data.PreparedDataset` with its splits (seen items and popularity are
    derived from them at its ``positive_threshold``).
    """
    out = Path(out)
    out.mkdir(parents=True)
    files = {}
    for relative, entry in sorted(dataset.manifest["files"].items()):
        if is_split_file(relative, dataset.manifest):
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dataset.path / relative, out / relative)
        files[relative] = entry
    splits = [split for split in dataset.manifest["counts"] if dataset.has_split(split)]
    seen = dataset.user_items(splits)
    offsets = pa.array(seen.offsets.astype(np.int32) if len(seen.values) < 2**31 else seen.offsets)
    items = pa.ListArray.from_arrays(offsets, pa.array(seen.values, pa.int64()))
    derived = {
        SEEN_FILE: pa.table({L.USER_ID: np.arange(dataset.num_users, dtype=np.int64), "items": items,
                             POSITIVE_TRAIN: dataset.user_items(["train"], positives=True).lengths}),
        POPULARITY_FILE: pa.table({L.ITEM_ID: np.arange(dataset.num_items, dtype=np.int64),
                                   "count": np.asarray(dataset.item_counts, np.int64)}),
    }
    for name, table in derived.items():
        pq.write_table(table, out / name)
        files[name] = {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name),
                       "rows": table.num_rows}
    manifest = {**dataset.manifest, "files": files, SERVING: True,
                "positive_threshold": dataset.positive_threshold}
    atomic_write_json(out / L.MANIFEST, manifest)
    return manifest


def read_popularity(root: Path, num_items: int) -> np.ndarray:
    """(I,) int64 positive training rows per item, from ``root/popularity.parquet``."""
    path = Path(root) / POPULARITY_FILE
    with parquet_errors(path):
        column = pq.read_table(path, columns=["count"])["count"]
    if len(column) != num_items:
        raise TrecError(f"{path}: {len(column)} rows, manifest says {num_items} items")
    check_indices(column, 0, 2**62, path, "count")
    return column.to_numpy().astype(np.int64)


def read_seen(root: Path, num_users: int, num_items: int) -> tuple[Csr, np.ndarray]:
    """(each user's items of every split: user index → sorted item indices, (U,) bool: the users with a
    positive training row, whom the retriever personalises), from ``root/seen.parquet``."""
    path = Path(root) / SEEN_FILE
    with parquet_errors(path):
        table = pq.read_table(path, columns=["items", POSITIVE_TRAIN])
    if table.num_rows != num_users:
        raise TrecError(f"{path}: {table.num_rows} rows, manifest says {num_users} users")
    csr = Csr.from_arrow(table["items"])
    check_indices(pa.array(csr.values), 0, num_items, path, "items")
    check_indices(table[POSITIVE_TRAIN], 0, 2**62, path, POSITIVE_TRAIN)
    return csr, table[POSITIVE_TRAIN].to_numpy() > 0
