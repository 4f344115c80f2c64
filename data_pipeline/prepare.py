"""`trec data prepare`: a Source → a prepared dataset directory (layout in :mod:`data_pipeline.layout`).

Four streaming passes, each over record batches, so memory is bounded by the per-value counts
a vocabulary needs plus per-user state, never by the rows. Only two options keep per-row state:
``--duplicates drop`` (8 bytes per interaction in the map pass, about 25 while the first of each
pair is found, then a 1-byte mask) and a temporal split (8 bytes per timestamp in the observe
pass, 16 while the cut is found):

1. **stage**: read and validate the source, count raw user/item/context values, write the
   normalised rows to a scratch Parquet file.
2. **map**: raw IDs → indices (vocab or hash; ``min_count`` drops interactions of rare users
   and items), scratch file of indices; find duplicate (user, item) pairs if they are dropped.
3. **observe**: per-user statistics for the split (interactions per user, latest timestamps).
4. **write**: assign train/val/test, write the split shards, count train interactions per
   item/user and gather user histories.

Then the feature tables and mappings (:mod:`data_pipeline.features`) and ``manifest.json`` (with
the sha256 of every file) are written. Everything happens in a temporary directory beside ``--out`` that is renamed into
place at the end, so a failure never leaves a partial dataset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import layout as L
from data_pipeline.features import feature_mapping, write_features
from data_pipeline.history import HistoryCollector
from data_pipeline.mapping import MANAGED_ID_BITS, Mapping, ValueCounter, build_mapping
from data_pipeline.sources import NUMERIC, Source
from data_pipeline.split import SPLIT_NAMES, TRAIN, Splitter
from data_pipeline.writer import ShardWriter, file_entries
from trec import __version__
from trec.config import Duplicates, IdMapping, PrepareConfig
from trec.errors import TrecError
from trec.io import atomic_directory, atomic_write_json, discard_interrupted, streaming_parquet

# Rows per batch of the scratch passes. Fixed: the seeded split draws per batch, so the batch
# boundaries are part of what makes a split reproducible.
PASS_BATCH_ROWS = 1 << 20

Log = Callable[[str], None]


@dataclass
class _Staged:
    path: Path
    rows: int
    counts: dict[str, pa.Table]


@dataclass
class _Mapped:
    path: Path
    rows: int
    keep: np.ndarray | None
    """Rows kept after dropping duplicates (None: all)."""
    dropped_rare: int
    dropped_duplicates: int = 0


@dataclass
class _Written:
    counts: dict[str, int]
    files: list[Path]
    item_train: np.ndarray
    user_train: np.ndarray
    history: tuple[np.ndarray, np.ndarray] | None


def prepare_dataset(source: Source, out: str | Path, options: PrepareConfig, overwrite: bool = False,
                    log: Log | None = None) -> dict:
    """Prepare ``source`` into the directory ``out``; returns the manifest (also written there)."""
    log = log or (lambda message: None)
    hash_buckets = _check_options(options, source)
    out = Path(out)
    _check_out_outside_source(out, source.path)
    if out.exists() and not overwrite:
        raise TrecError(f"{out}: already exists (pass --overwrite to replace it)")
    for stale in discard_interrupted(out):
        log(f"removed {stale}, left by an interrupted prepare")
    started = time.perf_counter()
    with atomic_directory(out, overwrite=True) as tmp:
        work = tmp / "_work"
        work.mkdir()
        staged = _timed(log, "stage", lambda: _stage(source, work / "raw.parquet"))
        ids = {
            L.USER_ID: _id_mapping(L.USER_ID, staged.counts["user"], options),
            L.ITEM_ID: _id_mapping(L.ITEM_ID, staged.counts["item"], options),
        }
        context = {
            f.name: feature_mapping(f.name, staged.counts[f.name], options, hash_buckets)
            for f in source.features if f.entity == "context"
        }
        mapped = _timed(log, "map", lambda: _map(staged, ids, context, options, work / "mapped.parquet"))
        num_users, num_items = ids[L.USER_ID].size, ids[L.ITEM_ID].size
        splitter = Splitter(options, num_users)
        _timed(log, "observe", lambda: _observe(mapped, splitter))
        written = _timed(log, "write", lambda: _write_splits(mapped, splitter, source, tmp, options,
                                                             num_users, num_items))
        features, files = _timed(log, "features", lambda: write_features(
            tmp, source, ids, context, {"user": written.user_train, "item": written.item_train}, written.history,
            options, hash_buckets))
        for path in sorted(work.iterdir()):
            path.unlink()
        work.rmdir()
        manifest = _manifest(source, options, ids, splitter, mapped, written, features,
                             file_entries(tmp, written.files + files))
        atomic_write_json(tmp / L.MANIFEST, manifest)
    log(f"prepared {manifest['num_interactions']} interactions, {num_users} users, {num_items} items "
        f"in {time.perf_counter() - started:.1f} s → {out}")
    return manifest


def _check_out_outside_source(out: Path, source_path: str) -> None:
    """Refuse an output directory that is (or is inside) the source: the prepare would read its own
    output (and its temporary directory beside ``out``), and --overwrite would delete the source.

    Paths are compared resolved (symlinks followed); a glob source counts from its last directory
    without a wildcard.
    """
    if not source_path:
        return  # synthetic
    parts = Path(source_path).parts
    plain = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
    root = Path(*parts[:plain]).resolve() if plain else Path.cwd().resolve()
    target = out.resolve()
    if target == root or root in target.parents:
        raise TrecError(f"--out {out} is inside --source {source_path}: write the dataset outside the source data")


def _timed(log: Log, name: str, step):
    started = time.perf_counter()
    result = step()
    log(f"  {name:<9} {time.perf_counter() - started:7.2f} s")
    return result


def _check_options(options: PrepareConfig, source: Source) -> dict[str, int]:
    """Validate the numeric options; returns the per-feature hash buckets from hash_features."""
    for name, low in (("rows_per_shard", 1), ("hash_buckets", 1), ("zch_size", 2), ("min_count", 1),
                      ("history_max_len", 0)):
        if getattr(options, name) < low:
            raise TrecError(f"{name} must be >= {low}, got {getattr(options, name)}")
    if options.split != "stratified" and not source.has_time:
        raise TrecError(f"the {options.split} split needs a time column (--time-col)")
    categorical = {f.name for f in source.features if f.kind != NUMERIC}
    buckets = {}
    for entry in options.hash_features:
        name, _, count = entry.partition(":")
        if name not in categorical:
            raise TrecError(f"hash_features: '{name}' is not a categorical feature of this source "
                            f"(features: {', '.join(sorted(categorical)) or 'none'})")
        if not count.isdigit() or int(count) < 1:
            raise TrecError(f"hash_features: '{entry}' must be NAME:BUCKETS with BUCKETS >= 1")
        buckets[name] = int(count)
    return buckets


def _id_mapping(name: str, counts: pa.Table, options: PrepareConfig) -> Mapping:
    return build_mapping(name, counts, str(options.id_mapping), options.min_count, options.hash_buckets,
                         options.zch_size)


# ---- pass 1: stage ---------------------------------------------------------------------------


def _stage(source: Source, path: Path) -> _Staged:
    counters = {"user": ValueCounter(), "item": ValueCounter()}
    counters.update({f.name: ValueCounter() for f in source.features if f.entity == "context"})
    writer, schema, rows = None, None, 0
    try:
        for batch in source.interactions():
            if writer is None:
                schema = _stage_schema(batch.schema)
                writer = pq.ParquetWriter(path, schema, compression="lz4")
            table = pa.Table.from_batches([batch]).cast(schema)
            for column, counter in counters.items():
                counter.add(table[column].combine_chunks())
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    if rows == 0:
        raise TrecError(f"{source.path or source.kind}: no interactions")
    types = {column: schema.field(column).type for column in counters}
    return _Staged(path, rows, {column: counter.result(types[column]) for column, counter in counters.items()})


def _stage_schema(schema: pa.Schema) -> pa.Schema:
    """A null-typed column (all values missing in the first batch) is stored as text."""
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema])


def _batches(path: Path, columns: list[str] | None = None) -> Iterator[tuple[pa.Table, int]]:
    """Fixed-size batches of a scratch file with the row number of their first row (no read-ahead:
    :func:`trec.io.streaming_parquet`)."""
    start = 0
    for batch in streaming_parquet(path).iter_batches(batch_size=PASS_BATCH_ROWS, columns=columns):
        yield pa.Table.from_batches([batch]), start
        start += batch.num_rows


# ---- pass 2: map -----------------------------------------------------------------------------


def _rare_ids(mapping: Mapping, min_count: int) -> pa.Array | None:
    """Raw IDs a hash mapping drops for min_count (a vocab leaves them out itself); None: none dropped."""
    if mapping.kind != "hash" or min_count <= 1:
        return None
    return mapping.counts.filter(pc.less(mapping.counts["count"], min_count))["raw"].combine_chunks()


def _id_indices(mapping: Mapping, values: pa.Array, rare: pa.Array | None) -> np.ndarray:
    """Indices of raw user/item IDs; -1 for IDs dropped by min_count (``rare``, from :func:`_rare_ids`)."""
    if mapping.kind != "hash":
        return mapping.lookup(values, unknown=-1)
    indices = mapping.lookup(values)
    if rare is not None:
        indices[pc.is_in(values, value_set=rare).to_numpy(zero_copy_only=False)] = -1
    return indices


def _map(staged: _Staged, ids: dict[str, Mapping], context: dict[str, Mapping], options: PrepareConfig,
         path: Path) -> _Mapped:
    writer = None
    rows = 0
    pair_keys: list[np.ndarray] = []
    num_items = ids[L.ITEM_ID].size
    rare_users, rare_items = (_rare_ids(ids[name], options.min_count) for name in (L.USER_ID, L.ITEM_ID))
    try:
        for table, _ in _batches(staged.path):
            users = _id_indices(ids[L.USER_ID], table["user"].combine_chunks(), rare_users)
            items = _id_indices(ids[L.ITEM_ID], table["item"].combine_chunks(), rare_items)
            keep = (users >= 0) & (items >= 0)
            columns = {L.USER_ID: users[keep], L.ITEM_ID: items[keep],
                       L.TIMESTAMP: table["timestamp"].to_numpy()[keep]}
            for name in (L.RATING, L.LABEL):
                if name in table.column_names:
                    columns[name] = table[name].to_numpy()[keep]
            for name, mapping in context.items():
                columns[name] = mapping.lookup(table[name].combine_chunks())[keep]
            out = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(path, out.schema, compression="lz4")
            writer.write_table(out)
            rows += out.num_rows
            if options.duplicates == Duplicates.drop:
                pair_keys.append(columns[L.USER_ID] * num_items + columns[L.ITEM_ID])
    finally:
        if writer is not None:
            writer.close()
    if rows == 0:
        raise TrecError(f"no interactions left after min_count={options.min_count}")
    mapped = _Mapped(path, rows, None, staged.rows - rows)
    if pair_keys:
        keys = np.concatenate(pair_keys)
        pair_keys.clear()  # else the per-batch copies stay alive while np.unique sorts: 8 more bytes a row
        _, first = np.unique(keys, return_index=True)
        del keys
        mapped.keep = np.zeros(rows, dtype=bool)
        mapped.keep[first] = True  # the first occurrence of each (user, item) pair in source order
        mapped.dropped_duplicates = rows - len(first)
    return mapped


def _mapped_batches(mapped: _Mapped, columns: list[str] | None = None) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Batches of the mapped scratch file with duplicates removed, and each row's sequence number."""
    for table, start in _batches(mapped.path, columns):
        seqs = np.arange(start, start + table.num_rows, dtype=np.int64)
        if mapped.keep is not None:
            keep = mapped.keep[start : start + table.num_rows]
            table, seqs = table.filter(pa.array(keep)), seqs[keep]
        yield table, seqs


# ---- pass 3: observe, pass 4: write -----------------------------------------------------------


def _observe(mapped: _Mapped, splitter: Splitter) -> None:
    columns = [L.USER_ID, L.TIMESTAMP]
    for table, seqs in _mapped_batches(mapped, columns):
        splitter.observe(table[L.USER_ID].to_numpy(), table[L.TIMESTAMP].to_numpy(), seqs)
    splitter.finish_observing()
    if splitter.needs_train_counts:
        for table, _ in _mapped_batches(mapped, columns):
            splitter.observe_train(table[L.USER_ID].to_numpy(), table[L.TIMESTAMP].to_numpy())
        splitter.finish_train_counts()


def interaction_schema(source: Source) -> pa.Schema:
    fields = [pa.field(L.USER_ID, pa.int64()), pa.field(L.ITEM_ID, pa.int64()),
              pa.field(L.TIMESTAMP, pa.int64()), pa.field(L.LABEL, pa.float32())]
    if source.has_rating:
        fields.append(pa.field(L.RATING, pa.float32()))
    fields += [pa.field(f.name, pa.int64()) for f in source.features if f.entity == "context"]
    return pa.schema(fields)


def _write_splits(mapped: _Mapped, splitter: Splitter, source: Source, root: Path, options: PrepareConfig,
                  num_users: int, num_items: int) -> _Written:
    schema = interaction_schema(source)
    names = [name for code, name in SPLIT_NAMES.items() if name != "val" or options.val_fraction > 0]
    writers = {name: ShardWriter(root / name, schema, options.rows_per_shard) for name in names}
    item_train = np.zeros(num_items, np.int64)
    user_train = np.zeros(num_users, np.int64)
    # Spilled by user range into the scratch directory, so memory stays bounded however many rows come.
    history = (HistoryCollector(num_users, options.history_max_len, num_items, spill_dir=root / "_work")
               if options.history_max_len > 0 else None)
    for table, seqs in _mapped_batches(mapped):
        users, items = table[L.USER_ID].to_numpy(), table[L.ITEM_ID].to_numpy()
        times = table[L.TIMESTAMP].to_numpy()
        codes = splitter.assign(users, times, seqs)
        if L.LABEL not in table.column_names:
            table = table.append_column(L.LABEL, pa.array(np.ones(table.num_rows, np.float32)))
        for code, name in SPLIT_NAMES.items():
            if name in writers:
                writers[name].write(table.filter(pa.array(codes == code)))
        train = codes == TRAIN
        item_train += np.bincount(items[train], minlength=num_items)
        user_train += np.bincount(users[train], minlength=num_users)
        if history is not None:
            # Only positives: the history says what the user liked, not what was shown to them.
            liked = train & (table[L.LABEL].to_numpy() >= L.DEFAULT_POSITIVE_THRESHOLD)
            history.add(users[liked], items[liked], times[liked])
    files = [path for writer in writers.values() for path in writer.close()]
    counts = {name: writer.rows for name, writer in writers.items()}
    return _Written(counts, files, item_train, user_train, history.result() if history is not None else None)


# ---- manifest ----------------------------------------------------------------------------------


def _manifest(source: Source, options: PrepareConfig, ids: dict[str, Mapping], splitter: Splitter,
              mapped: _Mapped, written: _Written, features: list[dict], files: dict) -> dict:
    names = [f["name"] for f in features]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise TrecError(f"feature names must be unique: {', '.join(duplicated)} appear twice")
    id_mapping = {"kind": str(options.id_mapping), "min_count": options.min_count}
    if options.id_mapping == IdMapping.hash:
        id_mapping["hash_buckets"] = options.hash_buckets
    if options.id_mapping == IdMapping.managed:
        id_mapping |= {"zch_size": options.zch_size, "input_hash_size": 1 << MANAGED_ID_BITS}
    return {
        "format_version": L.FORMAT_VERSION,
        "created_by": f"trec {__version__}",
        "source": source.describe(),
        "seed": options.seed,
        "split": splitter.describe(),
        "id_mapping": id_mapping,
        "num_users": ids[L.USER_ID].size,
        "num_items": ids[L.ITEM_ID].size,
        "counts": written.counts,
        "num_interactions": int(sum(written.counts.values())),
        "duplicates": str(options.duplicates),
        "dropped": {"duplicates": mapped.dropped_duplicates, "min_count": mapped.dropped_rare},
        "has_rating": source.has_rating,
        "has_label": source.has_label,
        "history_max_len": options.history_max_len,
        "history_positive_threshold": L.DEFAULT_POSITIVE_THRESHOLD,
        "rows_per_shard": options.rows_per_shard,
        "features": features,
        "files": files,
    }
