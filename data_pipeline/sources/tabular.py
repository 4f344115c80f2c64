"""Generic interaction logs: Parquet or CSV files (a file, a directory, or a glob).

Column names come from :class:`trec.config.ColumnsConfig` (flags ``--user-col``, ``--item-col``,
``--time-col``, ``--rating-col``, ``--label-col``, ``--user-features`` ... or the config's
``data.prepare.columns``). Side-feature columns live in the log itself: a user's (item's)
value is the one on its last row in source order. Feature names get their entity as prefix
(column ``age`` of a user → feature ``user_age``; ``device`` in context → ``context_device``)
unless the column name already starts with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import layout as L
from data_pipeline.readers import TextFormat, check_columns, display_names, read_parquet, read_text, resolve_files, text_header
from data_pipeline.sources import CATEGORICAL, NUMERIC, RawFeature, Source
from data_pipeline.validate import (
    INT_PATTERN,
    Location,
    category_array,
    check_range,
    check_rating,
    id_array,
    multi_hot_array,
    to_float64,
    to_int64,
    to_timestamp,
)
from trec.config import ColumnsConfig
from trec.errors import TrecError

_SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".tsv", ".txt", ".csv.gz")}


def feature_name(entity: str, column: str) -> str:
    prefix = f"{entity}_"
    return column if column.startswith(prefix) else prefix + column


class _LastValues:
    """Per entity ID, the feature values on its last row so far; memory O(distinct IDs)."""

    _COMPACT_ROWS = 2_000_000

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.parts.append(_keep_last(table))
        self.rows += self.parts[-1].num_rows
        if self.rows > self._COMPACT_ROWS:
            self.parts = [_keep_last(pa.concat_tables(self.parts))]
            self.rows = self.parts[0].num_rows

    def table(self) -> pa.Table | None:
        return _keep_last(pa.concat_tables(self.parts)) if self.parts else None


def _keep_last(table: pa.Table) -> pa.Table:
    """The last row of each ``id`` (rows in order of first appearance of the kept rows)."""
    codes = table["id"].combine_chunks().dictionary_encode().indices.to_numpy()
    _, first_from_end = np.unique(codes[::-1], return_index=True)
    last = np.sort(len(codes) - 1 - first_from_end)
    return table.take(pa.array(last))


class TabularSource(Source):
    def __init__(self, kind: str, path: str, columns: ColumnsConfig) -> None:
        super().__init__()
        self.kind = self.layout = kind
        self.columns = columns
        if not columns.user or not columns.item:
            raise TrecError("the user and item ID columns must be named (--user-col, --item-col)")
        files, root = resolve_files(path, _SUFFIXES[kind], kind)
        self.files = files
        self.display = display_names(files, root)
        self.path = str(Path(path).resolve()) if not any(ch in path for ch in "*?[") else path
        self.has_rating, self.has_label, self.has_time = bool(columns.rating), bool(columns.label), bool(columns.time)
        self._columns_of: dict[str, str] = {}  # feature name → source column
        for entity, names, kind_, multi in (
            ("user", columns.user_features, CATEGORICAL, False),
            ("user", columns.user_multi_hot_features, CATEGORICAL, True),
            ("user", columns.user_numeric_features, NUMERIC, False),
            ("item", columns.item_features, CATEGORICAL, False),
            ("item", columns.item_multi_hot_features, CATEGORICAL, True),
            ("item", columns.item_numeric_features, NUMERIC, False),
            ("context", columns.context_features, CATEGORICAL, False),
        ):
            for column in names:
                self._add_feature(RawFeature(feature_name(entity, column), entity, kind_, multi), column)
        self._collectors = {"user": _LastValues(), "item": _LastValues()}
        self._types: dict[str, tuple[pa.DataType, str]] = {}
        self._int_ids: bool | None = {"int": True, "string": False}.get(columns.id_type)
        if columns.id_type not in ("auto", "int", "string"):
            raise TrecError(f"id_type must be auto, int or string, got '{columns.id_type}'")

    def _add_feature(self, feature: RawFeature, column: str) -> None:
        reserved = {L.USER_ID, L.ITEM_ID, L.USER_HISTORY, L.TITLE, L.TRAIN_COUNT}
        if feature.name in reserved or column in (self.columns.user, self.columns.item):
            raise TrecError(f"feature column '{column}' clashes with a reserved name ({feature.name})")
        if feature.name in self._columns_of:
            raise TrecError(f"feature '{feature.name}' is configured twice (feature names must be unique)")
        self._columns_of[feature.name] = column
        self.features.append(feature)

    def _needed(self) -> list[str]:
        c = self.columns
        wanted = [c.user, c.item, c.time, c.rating, c.label, c.item_title, *self._columns_of.values()]
        return list(dict.fromkeys(name for name in wanted if name))

    # ---- reading ------------------------------------------------------------------------

    def interactions(self) -> Iterator[pa.RecordBatch]:
        for path, display in zip(self.files, self.display):
            for batch, loc in self._read(path, display):
                yield self._normalise(batch, loc)

    def _read(self, path: Path, display: str) -> Iterator[tuple[pa.RecordBatch, Location]]:
        if self.kind == "parquet":
            return read_parquet(path, display, self._needed())
        fmt = TextFormat(self.columns.csv_delimiter, quoting=True)
        check_columns(display, text_header(path, display, fmt), self._needed())
        return read_text(path, display, fmt)

    def _ids(self, batch: pa.RecordBatch, loc: Location, column: str) -> pa.Array:
        values = batch.column(column)
        if self.kind == "csv":
            if self._int_ids is None:  # auto: decided once, by the first batch of the first file
                self._int_ids = bool(pc.all(pc.match_substring_regex(values, INT_PATTERN)).as_py())
            ids = to_int64(values, loc, column) if self._int_ids else id_array(values, loc, column)
        else:
            ids = id_array(values, loc, column)
        return self._same_type(ids, loc, column)

    def _same_type(self, values: pa.Array, loc: Location, column: str) -> pa.Array:
        """Every file must give a column the same type (int IDs in one, text in another is an error)."""
        kind = values.type
        if pa.types.is_null(kind):
            return values
        first = self._types.setdefault(column, (kind, loc.file))
        if first[0] != kind:
            raise TrecError(f"{loc.file}: column {column}: type {kind} differs from {first[0]} in {first[1]}")
        return values

    def _normalise(self, batch: pa.RecordBatch, loc: Location) -> pa.RecordBatch:
        c = self.columns
        out = {"user": self._ids(batch, loc, c.user), "item": self._ids(batch, loc, c.item)}
        if c.time:
            out["timestamp"] = to_timestamp(batch.column(c.time), loc, c.time)
        else:
            out["timestamp"] = np.zeros(batch.num_rows, np.int64)
        if c.rating:
            rating = to_float64(batch.column(c.rating), loc, c.rating)
            check_rating(rating, loc, c.rating)
            out["rating"] = rating.astype(np.float32)
        if c.label:
            label = to_float64(batch.column(c.label), loc, c.label)
            check_range(label, loc, c.label, 0.0, 1.0)
            out["label"] = label.astype(np.float32)
        side = {"user": {"id": out["user"]}, "item": {"id": out["item"]}}
        for feature in self.features:
            column = self._columns_of[feature.name]
            values = self._feature_values(feature, batch.column(column), loc, column)
            if feature.entity == "context":
                out[feature.name] = values
            else:
                side[feature.entity][feature.name] = values
        if c.item_title:
            side["item"]["title"] = pc.cast(batch.column(c.item_title), pa.string())
        for entity, columns in side.items():
            if len(columns) > 1:
                self._collectors[entity].add(pa.table(columns))
        return pa.record_batch(out)

    def _feature_values(self, feature: RawFeature, values: pa.Array, loc: Location, column: str) -> pa.Array:
        if feature.kind == NUMERIC:
            return pa.array(to_float64(values, loc, column, allow_missing=True))
        if feature.multi_hot:
            return self._same_type(multi_hot_array(values, loc, column, self.columns.multi_hot_separator), loc, column)
        return self._same_type(category_array(values, loc, column), loc, column)

    def side_table(self, entity: str) -> pa.Table | None:
        return self._collectors[entity].table()
