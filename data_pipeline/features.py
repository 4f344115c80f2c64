"""The feature tables of a prepared dataset: users.parquet and items.parquet (mapped side features,
standardised numeric ones), the user history, every ID/feature mapping table, and their manifest
specs (format: :mod:`data_pipeline.layout`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import layout as L
from data_pipeline.mapping import Mapping, ValueCounter, build_mapping, representatives
from data_pipeline.sources import NUMERIC, RawFeature, Source
from data_pipeline.writer import write_table
from trec.config import PrepareConfig


def feature_mapping(name: str, counts: pa.Table, options: PrepareConfig, hash_buckets: dict[str, int]) -> Mapping:
    if name in hash_buckets:
        return build_mapping(name, counts, "hash", buckets=hash_buckets[name])
    return build_mapping(name, counts, "vocab", options.min_count)


def _categorical_spec(name: str, entity: str, mapping: Mapping, multi_hot: bool) -> dict:
    spec = {"name": name, "entity": entity, "kind": "categorical", "multi_hot": multi_hot,
            "cardinality": mapping.cardinality, "mapping": mapping.kind, "oov_index": mapping.oov_index,
            "mapping_file": L.mapping_file(mapping.feature)}
    if mapping.kind == "hash":
        spec["hash_buckets"] = mapping.size
    if mapping.kind == "managed":  # cardinality: catalog size; the model's table has zch_size rows
        spec["zch_size"] = mapping.zch_size
    return spec


def _side_rows(ids: Mapping, side: pa.Table | None) -> pa.Array | None:
    """For each index 0..n-1, the row of the raw side table describing it (null if none)."""
    if side is None:
        return None
    reps = representatives(ids)
    side_ids = side["id"].combine_chunks()
    if side_ids.type != reps.type:
        side_ids = side_ids.cast(reps.type)
    return pc.index_in(reps, value_set=side_ids)


def _entity_columns(entity: str, ids: Mapping, side: pa.Table | None, features: list[RawFeature],
                    options: PrepareConfig, hash_buckets: dict[str, int]) -> tuple[dict, list[dict], list[Mapping]]:
    """Columns of features/<entity>s.parquet (mapped side features), their manifest specs and mappings."""
    count = ids.size
    rows = _side_rows(ids, side)
    columns: dict[str, pa.Array] = {f"{entity}_id": pa.array(np.arange(count, dtype=np.int64))}
    specs, mappings = [], []
    for feature in features:
        if rows is None or feature.name not in side.column_names:
            raw = pa.nulls(count, pa.float64() if feature.kind == NUMERIC else pa.string())
        else:
            raw = side[feature.name].combine_chunks().take(rows)
        if feature.kind == NUMERIC:
            values = raw.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32)
            present = values[~np.isnan(values)]
            mean = float(present.mean()) if len(present) else 0.0
            std = float(present.std()) if len(present) else 1.0
            columns[feature.name] = pa.array(values, pa.float32())
            specs.append({"name": feature.name, "entity": entity, "kind": "numeric", "multi_hot": False,
                          "mean": mean, "std": std, "fill": "mean", "missing": int(len(values) - len(present))})
            continue
        if feature.multi_hot:
            raw = raw if not pa.types.is_null(raw.type) else pa.nulls(count, pa.list_(pa.string()))
            flat = pc.list_flatten(raw)
            counter = ValueCounter()
            counter.add(flat)
            mapping = feature_mapping(feature.name, counter.result(flat.type), options, hash_buckets)
            lengths = pc.fill_null(pc.list_value_length(raw), 0).to_numpy(zero_copy_only=False)
            offsets = np.zeros(count + 1, np.int32)
            np.cumsum(lengths, out=offsets[1:])
            columns[feature.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(mapping.lookup(flat)))
        else:
            counter = ValueCounter()
            counter.add(raw)
            mapping = feature_mapping(feature.name, counter.result(raw.type), options, hash_buckets)
            columns[feature.name] = pa.array(mapping.lookup(raw))
        specs.append(_categorical_spec(feature.name, entity, mapping, feature.multi_hot))
        mappings.append(mapping)
    if entity == "item" and side is not None and L.TITLE in side.column_names and rows is not None:
        columns[L.TITLE] = side[L.TITLE].combine_chunks().cast(pa.string()).take(rows)
    return columns, specs, mappings


def write_features(root: Path, source: Source, ids: dict[str, Mapping], context: dict[str, Mapping],
                   train_counts: dict[str, np.ndarray], history: tuple[np.ndarray, np.ndarray] | None,
                   options: PrepareConfig, hash_buckets: dict[str, int]) -> tuple[list[dict], list[Path]]:
    """Write features/users.parquet, items.parquet, the user history and every mapping table.

    ``train_counts``: {"user": (U,), "item": (I,)} training interactions per index; ``history``:
    (offsets, items) of the users' recent positive train items, or None. Returns (the manifest's
    feature specs, the files written).
    """
    specs: list[dict] = []
    files: list[Path] = []
    mappings = [ids[L.USER_ID], ids[L.ITEM_ID], *context.values()]
    for entity, file in (("user", L.USERS_FILE), ("item", L.ITEMS_FILE)):
        mapping = ids[f"{entity}_id"]
        features = [f for f in source.features if f.entity == entity]
        columns, entity_specs, entity_maps = _entity_columns(
            entity, mapping, source.side_table(entity), features, options, hash_buckets)
        columns[L.TRAIN_COUNT] = pa.array(train_counts[entity])
        files.append(write_table(root / file, pa.table(columns)))
        specs.append(_categorical_spec(f"{entity}_id", entity, mapping, False))
        specs += entity_specs
        mappings += entity_maps
        if entity == "user" and history is not None:
            files.append(write_history(root, history, mapping.size))
            history_spec = _categorical_spec(L.USER_HISTORY, "user", ids[L.ITEM_ID], True)
            history_spec.update({"vocab_of": L.ITEM_ID, "max_len": options.history_max_len, "file": L.HISTORY_FILE})
            specs.append(history_spec)
    specs += [_categorical_spec(name, "context", mapping, False) for name, mapping in context.items()]
    for mapping in mappings:
        files.append(write_table(root / L.mapping_file(mapping.feature), mapping.table()))
    return specs, files


def write_history(root: Path, history: tuple[np.ndarray, np.ndarray], num_users: int) -> Path:
    """features/user_history.parquet: one row per user index, its history items oldest first (CSR in)."""
    offsets, items = history
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(items, pa.int64()))
    table = pa.table({L.USER_ID: pa.array(np.arange(num_users, dtype=np.int64)), "history": lists})
    return write_table(root / L.HISTORY_FILE, table)
