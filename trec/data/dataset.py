"""A prepared dataset directory (:class:`PreparedDataset`): manifest, feature tables in memory,
split shards on disk, the user → items CSRs of evaluation and sampling, and batch building."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_pipeline import layout as L
from trec.data.batch import FeatureSpec, RecBatch, keyed_jagged
from trec.data.checks import check_finite, check_id_table, check_indices, parquet_errors, read_manifest
from trec.data.csr import Csr, pair_key
from trec.data.managed import is_managed, read_managed_ids
from trec.data.tables import SERVING, read_popularity
from trec.errors import TrecError


class PreparedDataset:
    """A prepared dataset directory: manifest, feature tables in memory, split shards on disk."""

    def __init__(self, path: Path, manifest: dict, positive_threshold: float = L.DEFAULT_POSITIVE_THRESHOLD) -> None:
        self.path = Path(path)
        self.manifest = manifest
        where = str(self.path / L.MANIFEST)
        self.features = [FeatureSpec.from_manifest(entry, where) for entry in manifest["features"]]
        self.sparse_features = [f for f in self.features if f.is_sparse]
        self.dense_features = [f for f in self.features if not f.is_sparse]
        self.num_users = int(manifest["num_users"])
        self.num_items = int(manifest["num_items"])
        self.has_rating = bool(manifest.get("has_rating", False))
        self.has_label = bool(manifest.get("has_label", False))
        self.positive_threshold = float(positive_threshold)
        """A row is a positive when its label is >= this (data.positive_threshold)."""
        self.context_names = [f.name for f in self.features if f.entity == "context"]
        self._single: dict[str, np.ndarray] = {}
        self._multi: dict[str, Csr] = {}
        self._numeric: dict[str, np.ndarray] = {}
        self._history: Csr | None = None
        self._raw_cache: dict[str, pa.Table] = {}
        self._user_items: dict[tuple, Csr] = {}
        self._positives: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}
        self._positive_counts: dict[float, np.ndarray] = {}
        self._titles: list[str] | None = None
        self._managed_ids: dict[str, np.ndarray] = {}
        self._load_tables()

    # ---- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, verify: bool = False,
             positive_threshold: float = L.DEFAULT_POSITIVE_THRESHOLD) -> "PreparedDataset":
        """Read and validate ``manifest.json``; ``verify`` also checks every file's sha256.

        ``positive_threshold`` (data.positive_threshold): rows with label >= it are positives.
        """
        return cls(Path(path), read_manifest(Path(path), verify), positive_threshold)

    def _load_tables(self) -> None:
        for entity, file in (("user", L.USERS_FILE), ("item", L.ITEMS_FILE)):
            with parquet_errors(self.path / file):
                table = pq.read_table(self.path / file)
            wanted = [L.TRAIN_COUNT] + [spec.name for spec in self.features_of(entity)
                                        if spec.name not in (L.USER_ID, L.ITEM_ID, L.USER_HISTORY)]
            missing = [name for name in wanted if name not in table.column_names]
            if missing:
                raise TrecError(f"{self.path / file}: no column '{missing[0]}' (the file does not match {L.MANIFEST})")
            expected = self.num_users if entity == "user" else self.num_items
            if table.num_rows != expected:
                raise TrecError(f"{self.path / file}: {table.num_rows} rows, manifest says {expected}")
            counts = table[L.TRAIN_COUNT].to_numpy().astype(np.int64)  # training rows per user / item
            if entity == "user":
                self.user_counts = counts
            else:
                self.item_train_rows = counts
                if L.TITLE in table.column_names:
                    self._titles = [t or "" for t in table[L.TITLE].to_pylist()]
            for spec in self.features_of(entity):
                if spec.name in (L.USER_ID, L.ITEM_ID):
                    check_id_table(spec, expected, self.path / L.MANIFEST)
                if spec.name in (L.USER_ID, L.ITEM_ID, L.USER_HISTORY):
                    continue
                column = table[spec.name]
                if spec.kind == "numeric":
                    self._numeric[spec.name] = spec.standardise(column)
                elif spec.multi_hot:  # -1: a missing hashed value (dropped, no lookup)
                    check_indices(pc.list_flatten(column), -1, spec.cardinality, self.path / file, spec.name)
                    self._multi[spec.name] = Csr.from_arrow(column)
                else:
                    check_indices(column, -1, spec.cardinality, self.path / file, spec.name)
                    self._single[spec.name] = column.to_numpy().astype(np.int64, copy=False)
        if any(f.name == L.USER_HISTORY for f in self.features):
            with parquet_errors(self.path / L.HISTORY_FILE):
                history = pq.read_table(self.path / L.HISTORY_FILE, columns=["history"])["history"]
            if len(history) != self.num_users:
                raise TrecError(f"{self.path / L.HISTORY_FILE}: {len(history)} rows, manifest says {self.num_users}")
            check_indices(pc.list_flatten(history), 0, self.feature(L.USER_HISTORY).cardinality,
                          self.path / L.HISTORY_FILE, "history")
            self._history = Csr.from_arrow(history)

    def check_split_rows(self, table: pa.Table, path: Path) -> None:
        """Refuse interaction rows whose indices have no row in their table (user, item, context).

        FBGEMM only logs an out-of-range index and looks up row 0 instead, and the feature tables
        are indexed by these too: a damaged or foreign shard would train on the wrong rows.
        Vectorised min/max per column, so it costs little beside reading the rows.
        """
        bounds = {L.USER_ID: (0, self.num_users), L.ITEM_ID: (0, self.num_items)}
        bounds |= {name: (-1, self.feature(name).cardinality) for name in self.context_names}
        for name, (low, high) in bounds.items():
            if name in table.column_names:
                check_indices(table[name], low, high, path, name)
        for name in (L.LABEL, L.RATING):  # a NaN label trains to a NaN (or zero) loss without a word
            if name in table.column_names:
                check_finite(table[name], path, name)

    # ---- metadata -----------------------------------------------------------------------

    def features_of(self, entity: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.entity == entity]

    def feature(self, name: str) -> FeatureSpec:
        for spec in self.features:
            if spec.name == name:
                return spec
        raise TrecError(f"{self.path}: no feature '{name}' (features: {', '.join(f.name for f in self.features)})")

    def split_files(self, split: str) -> list[Path]:
        prefix = f"{split}/"
        return [self.path / name for name in sorted(self.manifest["files"]) if name.startswith(prefix)]

    def has_split(self, split: str) -> bool:
        return bool(self.split_files(split))

    def num_rows(self, split: str) -> int:
        return int(self.manifest["counts"].get(split, 0))

    def item_titles(self) -> list[str] | None:
        return self._titles

    def summary(self) -> str:
        m = self.manifest
        counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items())
        lines = [
            f"{self.path}: {m['source'].get('kind')} ({m['source'].get('layout')}), format {m['format_version']}",
            f"  users {self.num_users}, items {self.num_items}, interactions {m.get('num_interactions')} ({counts})",
            f"  split {m['split']}, id mapping {m['id_mapping']}",
            "  features:",
        ]
        for f in self.features:
            detail = f"cardinality {f.cardinality}" if f.is_sparse else f"mean {f.mean:.4g} std {f.std:.4g}"
            lines.append(f"    {f.name:<22} {f.entity:<7} {f.kind:<11} {'multi-hot ' if f.multi_hot else ''}{detail}")
        return "\n".join(lines)

    # ---- ID mappings --------------------------------------------------------------------

    def mapping(self, feature: str) -> tuple[FeatureSpec, pa.Table]:
        """(the spec that owns ``feature``'s ID mapping (``vocab_of`` followed), its mapping table with
        columns raw, index), the table read once per dataset; TrecError for a feature without one."""
        spec = self.feature(feature)
        if spec.vocab_of:
            spec = self.feature(spec.vocab_of)
        if not spec.is_sparse or not spec.mapping_file:
            raise TrecError(f"feature '{feature}' has no ID mapping (it is {spec.kind})")
        if spec.name not in self._raw_cache:
            path = self.path / spec.mapping_file
            with parquet_errors(path):
                self._raw_cache[spec.name] = pq.read_table(path, columns=["raw", "index"])
        return spec, self._raw_cache[spec.name]

    def raw_ids(self, feature: str) -> np.ndarray:
        """index → raw ID of a vocab feature: array of length N (int64, or object of str)."""
        spec, table = self.mapping(feature)
        if spec.mapping not in ("vocab", "managed"):
            raise TrecError(f"feature '{spec.name}' is hash-mapped: indices cannot be turned back into raw IDs "
                            f"(seen raw IDs and their buckets are in {spec.mapping_file})")
        return table["raw"].to_numpy(zero_copy_only=False)

    def id_labels(self, feature: str) -> list[str]:
        """index → printable raw ID, for every index of the table (``cardinality`` entries).

        vocab: the raw ID ('' for the OOV row). hash: the most frequent raw ID the dataset saw in
        the bucket, with ``+N`` when N other seen IDs share it ('' for a bucket none hashes to),
        read from the mapping file, since a hash cannot be inverted.
        """
        spec, table = self.mapping(feature)
        labels = [""] * int(spec.cardinality)
        if spec.mapping in ("vocab", "managed"):
            for index, raw in enumerate(table["raw"].to_pylist()):
                labels[index] = str(raw)
            return labels
        shared = np.bincount(table["index"].to_numpy(), minlength=len(labels))
        # The mapping file lists seen IDs by descending count: the first of a bucket is its most frequent.
        for raw, index in zip(table["raw"].to_pylist(), table["index"].to_pylist()):
            if not labels[index]:
                labels[index] = str(raw) + (f"+{shared[index] - 1}" if shared[index] > 1 else "")
        return labels

    def lookup_index(self, feature: str, raw: object) -> int:
        """raw ID → index; TrecError for a raw ID the dataset has never seen."""
        spec, table = self.mapping(feature)
        raw_column = table["raw"].combine_chunks()
        try:
            value = int(raw) if pa.types.is_integer(raw_column.type) else str(raw)
        except (TypeError, ValueError):
            value = None
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            value = None  # beyond int64: no raw ID of the dataset (and Arrow would overflow)
        found = None
        if value is not None:
            hit = pc.index_in(pa.array([value], raw_column.type), value_set=raw_column)[0].as_py()
            found = None if hit is None else int(table["index"][hit].as_py())
        if found is None:
            raise TrecError(f"{spec.name}: unknown raw ID {raw!r} (not in {spec.mapping_file})")
        return found

    # ---- evaluation helpers ---------------------------------------------------------------

    def read_split(self, split: str, columns: Sequence[str] = (L.USER_ID, L.ITEM_ID)) -> pa.Table:
        files = self.split_files(split)
        if not files:
            return pa.table({c: pa.array([], pa.int64()) for c in columns})
        tables = []
        for path in files:
            with parquet_errors(path):
                tables.append(pq.read_table(path, columns=list(columns)))
        for table, path in zip(tables, files):
            self.check_split_rows(table, path)
        return pa.concat_tables(tables)

    def user_items(self, splits: Sequence[str], positives: bool = False) -> Csr:
        """Each user's items over ``splits``: a Csr of num_users rows, items sorted and unique per user.

        Every interaction whatever its label (what the user has seen), or with ``positives`` only
        the rows with label >= ``positive_threshold``. Built once per set of splits and kept (every
        validation asks for the same one): the arrays are shared, so callers must not modify them.
        """
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        cache_key = (splits, self.positive_threshold if positives else None)
        if cache_key not in self._user_items:
            if positives:
                keys = [self.positive_pairs(split)[0] for split in splits]
            else:
                keys = [self._split_keys(split) for split in splits]
            keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
            self._user_items[cache_key] = Csr.from_keys(keys, self.num_users, self.num_items)
        return self._user_items[cache_key]

    def _split_keys(self, split: str) -> np.ndarray:
        table = self.read_split(split)
        return pair_key(table[L.USER_ID].to_numpy(), table[L.ITEM_ID].to_numpy(), self.num_items)

    def positive_pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's positive (user, item) pairs: (sorted unique keys :func:`~trec.data.csr.pair_key`,
        their float32 labels), the highest label where a pair occurs more than once."""
        cache_key = (split, self.positive_threshold)
        if cache_key not in self._positives:
            table = self.read_split(split, (L.USER_ID, L.ITEM_ID, L.LABEL))
            labels = table[L.LABEL].to_numpy().astype(np.float32)
            keep = labels >= self.positive_threshold
            keys = pair_key(table[L.USER_ID].to_numpy(), table[L.ITEM_ID].to_numpy(), self.num_items)[keep]
            labels = labels[keep]
            order = np.lexsort((labels, keys))  # by key, the highest label last
            keys, labels = keys[order], labels[order]
            last = np.flatnonzero(np.append(keys[1:] != keys[:-1], True)) if len(keys) else np.zeros(0, np.int64)
            self._positives[cache_key] = keys[last].astype(np.int64), labels[last]
        return self._positives[cache_key]

    def user_positive_labels(self, split: str) -> tuple[Csr, np.ndarray]:
        """Each user's positive items in ``split`` and their labels: (the Csr of
        ``user_items([split], positives=True)``, (N,) float32 labels aligned with its values)."""
        return self.user_items([split], positives=True), self.positive_pairs(split)[1]

    @property
    def item_counts(self) -> np.ndarray:
        """(I,) int64 positive training rows per item (label >= ``positive_threshold``): an item's
        popularity, for logQ, popular negatives and the popularity baseline."""
        threshold = self.positive_threshold
        if threshold not in self._positive_counts:
            if self.manifest.get(SERVING):  # request-time tables: counted when they were written
                counts = read_popularity(self.path, self.num_items)
            elif not self.has_label and threshold <= 1.0:
                counts = self.item_train_rows  # no label column: every row has label 1.0
            else:
                counts = self._count_positive_items()
            if counts.sum() == 0 and self.item_train_rows.sum() > 0:
                raise TrecError(f"{self.path}: no training row has label >= {threshold} "
                                "(data.positive_threshold); lower it or check the label column")
            self._positive_counts[threshold] = counts
        return self._positive_counts[threshold]

    def _count_positive_items(self) -> np.ndarray:
        """Positive train rows per item, read one file at a time (duplicates counted, as train_count does)."""
        counts = np.zeros(self.num_items, np.int64)
        for path in self.split_files("train"):
            with parquet_errors(path):
                table = pq.read_table(path, columns=[L.ITEM_ID, L.LABEL])
            self.check_split_rows(table, path)
            positive = table[L.LABEL].to_numpy() >= self.positive_threshold
            counts += np.bincount(table[L.ITEM_ID].to_numpy()[positive], minlength=self.num_items)
        return counts

    # ---- batches ------------------------------------------------------------------------

    def build_batch(
        self,
        users: np.ndarray,
        items: np.ndarray,
        labels: np.ndarray,
        ratings: np.ndarray | None = None,
        history_exclude: np.ndarray | None = None,
        history_max_len: int | None = None,
        context: dict[str, np.ndarray] | None = None,
    ) -> RecBatch:
        """A RecBatch of R = len(users) rows; the first B = len(labels) rows are labelled.

        users, items: (R,) int64 indices, -1 = no user / no item on that row. history_max_len:
        most recent history items per row (default: all the dataset keeps). history_exclude: (R,)
        an item removed from each row's history (a training row's own target, so a model cannot
        learn "the target is in the history"; -1 or None: nothing removed). context: per context feature, (C,) indices
        for the first C rows (C <= R; later rows get empty context keys).
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(f"users and items must be equal-length vectors, got {users.shape} and {items.shape}")
        rows = len(users)
        # Copies: Arrow hands out read-only buffers, and torch tensors must own writable memory.
        labels = np.array(labels, dtype=np.float32)
        if len(labels) > rows:
            raise ValueError(f"{len(labels)} labels for {rows} rows")
        ratings = np.zeros(len(labels), np.float32) if ratings is None else np.array(ratings, dtype=np.float32)
        lengths, values = [], []
        for spec in self.sparse_features:
            spec_lengths, spec_values = self._sparse(spec, users, items, context or {}, rows,
                                                     history_exclude, history_max_len)
            lengths.append(spec_lengths)
            values.append(spec_values)
        kjt = keyed_jagged([spec.name for spec in self.sparse_features], lengths, values, rows)
        return RecBatch(
            dense_features=torch.from_numpy(self._dense(users, items)),
            sparse_features=kjt,
            labels=torch.from_numpy(labels),
            ratings=torch.from_numpy(ratings),
        )

    def _sparse(self, spec: FeatureSpec, users: np.ndarray, items: np.ndarray, context: dict, rows: int,
                exclude: np.ndarray | None, history_max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
        if spec.entity == "context":
            values = np.full(rows, -1, np.int64)
            given = context.get(spec.name)
            if given is not None:
                values[: len(given)] = given
            present = values >= 0
            return present.astype(np.int32), values[present]
        index = users if spec.entity == "user" else items
        if spec.name == L.USER_HISTORY:
            max_len = (spec.max_len or 0) if history_max_len is None else history_max_len
            if max_len <= 0 or self._history is None:
                return np.zeros(rows, np.int32), np.zeros(0, np.int64)
            lengths, values = self._history.last(index, max_len, exclude)
            return lengths, self.model_ids(self.feature(L.ITEM_ID), values)
        if spec.name in (L.USER_ID, L.ITEM_ID):
            present = index >= 0
            return present.astype(np.int32), self.model_ids(spec, index[present])
        if spec.multi_hot:
            return self._multi[spec.name].rows(index)
        table = self._single[spec.name]
        values = np.where(index >= 0, table[np.where(index >= 0, index, 0)], -1)
        present = values >= 0  # hashed side features store -1 for a missing value
        return present.astype(np.int32), values[present]

    def model_ids(self, spec: FeatureSpec, indices: np.ndarray) -> np.ndarray:
        """What the model's KJT carries for catalog ``indices`` of user_id/item_id: the indices
        themselves, or for a managed mapping their managed IDs (:mod:`trec.data.managed`)."""
        if not is_managed(spec):
            return indices
        if spec.name not in self._managed_ids:
            self._managed_ids[spec.name] = read_managed_ids(self.path, spec)
        return self._managed_ids[spec.name][indices]

    def _dense(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(R X F) standardised numeric features; 0 (the mean) where the row has no entity."""
        dense = np.zeros((len(users), len(self.dense_features)), np.float32)
        for column, spec in enumerate(self.dense_features):
            index = users if spec.entity == "user" else items
            present = index >= 0
            dense[present, column] = self._numeric[spec.name][index[present]]
        return dense
