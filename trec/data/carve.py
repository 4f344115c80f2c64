"""A validation split carved from a prepared dataset's train split, as a prepared dataset of its own.

``training.validation: auto`` early-stops on it when the user's dataset has no ``val`` split. The
carve is what ``trec data prepare --val-fraction F`` would have written: per user,
``round(train_u × F)`` of the user's train rows, chosen at random (seeded, the same hypergeometric
streaming draw), leaving at least one train row. Everything learnt from train is rebuilt from the
remaining rows, so the validation items leak nowhere: the ``user_history`` feature (positive train
rows, newest ``history_max_len``, by time then source order) and the train counts of users and
items (popularity, logQ correction). Test shards and ID mappings are hard-linked, not copied.

The result is written to a temporary directory and renamed; its manifest records the fingerprint
of the dataset it came from (``derived_from``), so a carve is reused only for that dataset.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import layout as L
from data_pipeline.features import write_history
from data_pipeline.history import HistoryCollector
from data_pipeline.split import draw_per_user, val_counts
from data_pipeline.writer import ShardWriter, file_entries, write_table
from trec.data.checks import parquet_errors
from trec.data.dataset import PreparedDataset
from trec.errors import TrecError
from trec.io import atomic_write_json, read_json_object

_REWRITTEN = ("train/", "val/", L.USERS_FILE, L.ITEMS_FILE, L.HISTORY_FILE)


def carved_matches(out: Path, fingerprint: str, fraction: float, seed: int) -> bool:
    """True when ``out`` already holds the carve of (the dataset with ``fingerprint``, ``fraction``, ``seed``)."""
    manifest = Path(out) / L.MANIFEST
    if not manifest.is_file():
        return False
    return read_json_object(manifest).get("derived_from") == _origin(fingerprint, fraction, seed)


def carve_validation(dataset: PreparedDataset, fingerprint: str, out: Path, fraction: float, seed: int) -> Path:
    """Write ``dataset`` with ``fraction`` of each user's train rows moved to a ``val`` split into ``out``."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_users, train_items, history = _split_train(dataset, tmp, fraction, seed)
        _write_counts(dataset, tmp, train_users, train_items)
        if history is not None:
            write_history(tmp, history, dataset.num_users)
        manifest = _manifest(dataset, tmp, fingerprint, fraction, seed)
        atomic_write_json(tmp / L.MANIFEST, manifest)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _origin(fingerprint: str, fraction: float, seed: int) -> dict:
    return {"dataset_fingerprint": fingerprint, "val_fraction": float(fraction), "seed": int(seed)}


def _split_train(dataset: PreparedDataset, root: Path, fraction: float, seed: int):
    """Stream the train shards into train/ and val/; (user train counts (U,), item train counts (I,), history CSR)."""
    files = dataset.split_files("train")
    schema = pq.read_schema(files[0])
    rows_per_shard = int(dataset.manifest.get("rows_per_shard", 1_000_000))
    writers = {name: ShardWriter(root / name, schema, rows_per_shard) for name in ("train", "val")}
    remaining = dataset.user_counts.copy()  # the users.parquet train_count column: rows per user in train
    slots = val_counts(remaining, fraction)
    rng = np.random.default_rng(seed)
    users_out, items_out = np.zeros(dataset.num_users, np.int64), np.zeros(dataset.num_items, np.int64)
    max_len = int(dataset.manifest.get("history_max_len", 0))
    collector = HistoryCollector(dataset.num_users, max_len, dataset.num_items) if L.HISTORY_FILE in dataset.manifest["files"] else None
    threshold = float(dataset.manifest.get("history_positive_threshold", L.DEFAULT_POSITIVE_THRESHOLD))
    for path in files:  # shards and batches in source order: history ties keep the prepare's order
        for table in _checked_batches(dataset, path, schema):
            users, items = table[L.USER_ID].to_numpy(), table[L.ITEM_ID].to_numpy()
            val = draw_per_user(rng, users, remaining, slots)
            writers["val"].write(table.filter(pa.array(val)))
            writers["train"].write(table.filter(pa.array(~val)))
            train = ~val
            users_out += np.bincount(users[train], minlength=dataset.num_users)
            items_out += np.bincount(items[train], minlength=dataset.num_items)
            if collector is not None:
                liked = train & (table[L.LABEL].to_numpy() >= threshold)
                collector.add(users[liked], items[liked], table[L.TIMESTAMP].to_numpy()[liked])
    for writer in writers.values():
        writer.close()
    return users_out, items_out, collector.result() if collector is not None else None


def _checked_batches(dataset: PreparedDataset, path: Path, schema: pa.Schema):
    """``path``'s row groups, checked as the training reader checks them (errors name ``path``)."""
    with parquet_errors(path):
        shard = pq.ParquetFile(path)
    for group in range(shard.num_row_groups):
        with parquet_errors(path):
            table = shard.read_row_group(group).cast(schema)
        dataset.check_split_rows(table, path)
        yield table


def _write_counts(dataset: PreparedDataset, root: Path, user_counts: np.ndarray, item_counts: np.ndarray) -> None:
    """users.parquet / items.parquet with their train_count columns recounted over the carved train split."""
    for file, counts in ((L.USERS_FILE, user_counts), (L.ITEMS_FILE, item_counts)):
        table = pq.read_table(dataset.path / file)
        index = table.column_names.index(L.TRAIN_COUNT)
        column = pa.array(counts).cast(table.schema.field(L.TRAIN_COUNT).type)
        write_table(root / file, table.set_column(index, L.TRAIN_COUNT, column))


def _manifest(dataset: PreparedDataset, root: Path, fingerprint: str, fraction: float, seed: int) -> dict:
    """The source manifest with the new splits' counts and files; unchanged files are hard-linked."""
    manifest = dict(dataset.manifest)
    files = {}
    for relative, entry in manifest["files"].items():
        if not relative.startswith(_REWRITTEN):
            _link(dataset.path / relative, root / relative)
            files[relative] = entry
    written = [path for path in root.rglob("*.parquet")
               if path.relative_to(root).as_posix() not in files]
    files |= file_entries(root, written)
    counts = {split: sum(entry["rows"] for name, entry in files.items() if name.startswith(f"{split}/"))
              for split in L.SPLITS}
    manifest["files"] = dict(sorted(files.items()))
    if not counts["val"]:
        raise TrecError(f"{dataset.path}: training.validation=auto carved no validation rows (a share of "
                        f"{fraction} of each user's train rows rounds to 0); prepare a val split "
                        "(--val-fraction) or set training.validation=split")
    manifest["counts"] = counts
    manifest["split"] = dict(manifest["split"], val_fraction=float(fraction))
    manifest["derived_from"] = _origin(fingerprint, fraction, seed)
    return manifest


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(source, target)
