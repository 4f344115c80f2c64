"""Prepared dataset → :class:`RecBatch` (a torchrec ``Batch`` with a ``KeyedJaggedTensor``) per rank.

The dataset directory is written by ``trec data prepare`` (format: :mod:`data_pipeline.layout`,
README "Data"). Typical use in a training loop::

    dataset = PreparedDataset.open(cfg.data.path)
    reader = InteractionReader(dataset, "train", cfg.data.batch_size, rank, world_size, seed=seed)
    reader.load_state_dict(checkpoint["reader"])          # optional: resume mid-epoch
    for epoch in range(start_epoch, epochs):
        reader.set_epoch(epoch)                           # keeps the position if it is that epoch
        for batch in reader:                              # RecBatch, prefetched by a thread
            ...
            checkpoint["reader"] = reader.state_dict()    # {"epoch": e, "batch": k}

A batch has B labelled (user, item) rows followed by N item-only rows (extra candidates, added
by an ``augment`` hook). Features are joined from in-memory user/item tables by
:meth:`PreparedDataset.build_batch`, which is fully vectorised (numpy, no per-row Python).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline import layout as L
from trec.errors import TrecError
from trec.io import JsonField, check_json_fields, path_inside, quote, read_json_object, sha256_file

Augment = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator],
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
]


# --------------------------------------------------------------------------------------------
# batch and feature specs
# --------------------------------------------------------------------------------------------


@dataclass
class RecBatch(Batch):
    """B labelled (user, item) rows, followed by N item-only rows (extra candidate items).

    dense_features: (B+N) X F float32 — standardised numeric features, in manifest order
        (zeros where the row has no such entity; F may be 0).
    sparse_features: KeyedJaggedTensor, stride B+N, keys = every categorical feature in
        manifest order (user_* incl. user_id and user_history, item_* incl. item_id, context
        features); a row with user index -1 has empty user keys, a row with item index -1 has
        empty item keys. values int64, lengths int32.
    labels: (B,) float32, the dataset's labels (1.0 where the source has none; a row is a
        positive when its label is >= data.positive_threshold). The ranker's sampler rewrites
        them to click targets (1 positive, 0 negative, -1 a padding row the loss ignores).
    ratings: (B,) float32 (0 where the source has no rating).
    """

    ratings: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "RecBatch":
        return RecBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            ratings=self.ratings.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.ratings.record_stream(stream)

    def pin_memory(self) -> "RecBatch":
        return RecBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            ratings=self.ratings.pin_memory(),
        )

    @property
    def num_labelled(self) -> int:
        return int(self.labels.shape[0])

    def nbytes(self) -> int:
        """Bytes of the batch's tensors (for throughput in MB/s)."""
        kjt = self.sparse_features
        tensors = [self.dense_features, self.labels, self.ratings, kjt.values(), kjt.lengths()]
        return int(sum(t.numel() * t.element_size() for t in tensors))


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the manifest (``features`` list); also the KJT key / dense column name."""

    name: str
    entity: str
    """'user', 'item' or 'context'."""
    kind: str
    """'categorical' (a KJT key) or 'numeric' (a dense column)."""
    multi_hot: bool = False
    cardinality: int | None = None
    """Embedding-table rows (vocab size + 1 for OOV, or hash buckets)."""
    oov_index: int | None = None
    mapping: str | None = None
    """'vocab' or 'hash'."""
    mapping_file: str | None = None
    mean: float | None = None
    std: float | None = None
    vocab_of: str | None = None
    """user_history: its indices are those of this feature (item_id)."""
    max_len: int | None = None

    @property
    def is_sparse(self) -> bool:
        return self.kind == "categorical"

    @classmethod
    def from_manifest(cls, entry: dict, where: str) -> "FeatureSpec":
        if not isinstance(entry, dict):
            raise TrecError(f"{where}: a feature must be an object, got {quote(entry)}")
        check_json_fields(entry, {"name": _FEATURE_FIELDS["name"]}, f"{where}: a feature")
        check_json_fields(entry, _FEATURE_FIELDS, f"{where}: feature '{entry['name']}'")
        if entry["entity"] not in L.ENTITIES or entry["kind"] not in ("categorical", "numeric"):
            raise TrecError(f"{where}: feature '{entry['name']}': bad entity/kind "
                            f"{quote(entry['entity'])}/{quote(entry['kind'])}")
        if entry["kind"] == "categorical" and entry.get("cardinality") is None:
            raise TrecError(f"{where}: categorical feature '{entry['name']}' has no cardinality")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in entry.items() if k in known})


# The JSON type of every field of a manifest's feature entry (data_pipeline writes them); a new
# field is one more line here. Other keys ("fill", "missing", "file") are not read.
_FEATURE_FIELDS = {
    "name": JsonField(str),
    "entity": JsonField(str),
    "kind": JsonField(str),
    "multi_hot": JsonField(bool, required=False),
    "cardinality": JsonField(int, minimum=1, nullable=True, required=False),
    "oov_index": JsonField(int, minimum=0, nullable=True, required=False),
    "mapping": JsonField(str, nullable=True, required=False),
    "mapping_file": JsonField(str, nullable=True, required=False),
    "mean": JsonField(float, nullable=True, required=False),
    "std": JsonField(float, minimum=0, nullable=True, required=False),
    "vocab_of": JsonField(str, nullable=True, required=False),
    "max_len": JsonField(int, minimum=0, nullable=True, required=False),
}


# --------------------------------------------------------------------------------------------
# vectorised gathers
# --------------------------------------------------------------------------------------------


def gather_ranges(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate values[starts[r] : starts[r] + lengths[r]] over rows r, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=values.dtype)
    out_starts = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - out_starts, lengths) + np.arange(total)
    return values[positions]


@dataclass
class _Csr:
    """A list column as offsets (E+1,) and values: row e holds values[offsets[e]:offsets[e+1]]."""

    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> "_Csr":
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(column) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        missing = values < 0
        if missing.any():  # -1: a missing (null) element of a hashed multi-hot list; no lookup, like single-hot
            rows = np.repeat(np.arange(len(lengths)), lengths)
            np.cumsum(np.bincount(rows[~missing], minlength=len(lengths)), out=offsets[1:])
            values = values[~missing]
        return cls(offsets, values)

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (R,), values) of rows ``index``; index -1 → an empty row."""
        present = index >= 0
        safe = np.where(present, index, 0)
        starts = self.offsets[safe]
        lengths = np.where(present, self.offsets[safe + 1] - starts, 0)
        return lengths, gather_ranges(self.values, starts, lengths)

    def last(self, index: np.ndarray, max_len: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row's last ``max_len`` values (oldest first), without the row's ``exclude`` value.

        With ``exclude`` the last max_len + 1 values are read, so that dropping the excluded one
        still leaves max_len; a window that did not contain it loses its oldest value instead.
        Exact unless the excluded value occurs more than once (possible only with duplicates
        kept): then fewer remain. Hits are rare, so they are located by position, not per row.
        """
        present = index >= 0
        safe = np.where(present, index, 0)
        ends = self.offsets[safe + 1]
        width = max_len + (exclude is not None)
        window = np.minimum(np.where(present, ends - self.offsets[safe], 0), width)
        values = gather_ranges(self.values, ends - window, window)
        if exclude is None:
            return window, values
        keep = values != np.repeat(exclude, window)
        out_ends = np.cumsum(window)
        hit_rows = np.searchsorted(out_ends, np.flatnonzero(~keep), side="right")
        hits = np.bincount(hit_rows, minlength=len(index))
        overfull = np.flatnonzero((window == width) & (hits == 0))
        keep[(out_ends - window)[overfull]] = False
        lengths = window - hits
        lengths[overfull] -= 1
        return lengths, values[keep]


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------

# The JSON type of every manifest field trec reads (README "Data"); a new field is one more line.
_MANIFEST_FIELDS = {
    "format_version": JsonField(int),
    "num_users": JsonField(int, minimum=1),
    "num_items": JsonField(int, minimum=1),
    "counts": JsonField(dict),
    "features": JsonField(list, items=JsonField(dict)),
    "files": JsonField(dict),
    "split": JsonField(dict),
    "id_mapping": JsonField(dict),
    "num_interactions": JsonField(int, minimum=0, required=False),
    "has_rating": JsonField(bool, required=False),
    "has_label": JsonField(bool, required=False),
    "history_max_len": JsonField(int, minimum=0, required=False),
    "source": JsonField(dict, required=False),
}
_FILE_FIELDS = {"bytes": JsonField(int, minimum=0), "sha256": JsonField(str),
                "rows": JsonField(int, minimum=0, required=False)}
_ROW_COUNT = JsonField(int, minimum=0)


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
        self._multi: dict[str, _Csr] = {}
        self._numeric: dict[str, np.ndarray] = {}
        self._history: _Csr | None = None
        self._raw_cache: dict[str, pa.Table] = {}
        self._user_items: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._positives: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}
        self._positive_counts: dict[float, np.ndarray] = {}
        self._titles: list[str] | None = None
        self._load_tables()

    # ---- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, verify: bool = False,
             positive_threshold: float = L.DEFAULT_POSITIVE_THRESHOLD) -> "PreparedDataset":
        """Read and validate ``manifest.json``; ``verify`` also checks every file's sha256.

        ``positive_threshold`` (data.positive_threshold): rows with label >= it are positives.
        """
        path = Path(path)
        manifest_path = path / L.MANIFEST
        if not manifest_path.is_file():
            raise TrecError(f"{path}: not a prepared dataset (no {L.MANIFEST}; create one with `trec data prepare`)")
        manifest = read_json_object(manifest_path)
        version = manifest.get("format_version")
        if version != L.FORMAT_VERSION:
            raise TrecError(f"{manifest_path}: format_version {version} is not supported (this trec reads "
                            f"{L.FORMAT_VERSION}); prepare the dataset again with this version")
        _check_manifest_fields(manifest, path, str(manifest_path))
        for relative in manifest["files"]:
            if not (path / relative).is_file():
                raise TrecError(f"{path / relative}: missing (listed in {L.MANIFEST})")
        if verify:
            verify_files(path, manifest["files"])
        return cls(path, manifest, positive_threshold)

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
                    _check_id_table(spec, expected, self.path / L.MANIFEST)
                if spec.name in (L.USER_ID, L.ITEM_ID, L.USER_HISTORY):
                    continue
                column = table[spec.name]
                if spec.kind == "numeric":
                    self._numeric[spec.name] = _standardise(column, spec)
                elif spec.multi_hot:  # -1: a missing hashed value (dropped, no lookup)
                    check_indices(pc.list_flatten(column), -1, spec.cardinality, self.path / file, spec.name)
                    self._multi[spec.name] = _Csr.from_arrow(column)
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
            self._history = _Csr.from_arrow(history)

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

    def _mapping(self, feature: str) -> tuple[FeatureSpec, pa.Table]:
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
        spec, table = self._mapping(feature)
        if spec.mapping != "vocab":
            raise TrecError(f"feature '{spec.name}' is hash-mapped: indices cannot be turned back into raw IDs "
                            f"(seen raw IDs and their buckets are in {spec.mapping_file})")
        return table["raw"].to_numpy(zero_copy_only=False)

    def id_labels(self, feature: str) -> list[str]:
        """index → printable raw ID, for every index of the table (``cardinality`` entries).

        vocab: the raw ID ('' for the OOV row). hash: the most frequent raw ID the dataset saw in
        the bucket, with ``+N`` when N other seen IDs share it ('' for a bucket none hashes to),
        read from the mapping file, since a hash cannot be inverted.
        """
        spec, table = self._mapping(feature)
        labels = [""] * int(spec.cardinality)
        if spec.mapping == "vocab":
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
        spec, table = self._mapping(feature)
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

    def user_items(self, splits: Sequence[str], positives: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """CSR of each user's items over ``splits``: offsets (num_users+1,), items (sorted, unique per user).

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
                keys = [self._pair_keys(split) for split in splits]
            keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
            self._user_items[cache_key] = self._csr(keys)
        return self._user_items[cache_key]

    def _csr(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique keys ``user * num_items + item`` → (offsets (num_users+1,), items)."""
        users, items = np.divmod(keys, self.num_items)
        offsets = np.zeros(self.num_users + 1, np.int64)
        np.cumsum(np.bincount(users, minlength=self.num_users), out=offsets[1:])
        return offsets, items.astype(np.int64)

    def _pair_keys(self, split: str) -> np.ndarray:
        table = self.read_split(split)
        return table[L.USER_ID].to_numpy() * self.num_items + table[L.ITEM_ID].to_numpy()

    def positive_pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's positive (user, item) pairs: (sorted unique keys ``user * num_items + item``,
        their float32 labels), the highest label where a pair occurs more than once."""
        cache_key = (split, self.positive_threshold)
        if cache_key not in self._positives:
            table = self.read_split(split, (L.USER_ID, L.ITEM_ID, L.LABEL))
            labels = table[L.LABEL].to_numpy().astype(np.float32)
            keep = labels >= self.positive_threshold
            keys = (table[L.USER_ID].to_numpy() * self.num_items + table[L.ITEM_ID].to_numpy())[keep]
            labels = labels[keep]
            order = np.lexsort((labels, keys))  # by key, the highest label last
            keys, labels = keys[order], labels[order]
            last = np.flatnonzero(np.append(keys[1:] != keys[:-1], True)) if len(keys) else np.zeros(0, np.int64)
            self._positives[cache_key] = keys[last].astype(np.int64), labels[last]
        return self._positives[cache_key]

    def user_positive_labels(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR of each user's positive items in ``split`` with their labels: (offsets (num_users+1,),
        items, labels), the same items as ``user_items([split], positives=True)``."""
        keys, labels = self.positive_pairs(split)
        return (*self._csr(keys), labels)

    @property
    def item_counts(self) -> np.ndarray:
        """(I,) int64 positive training rows per item (label >= ``positive_threshold``): an item's
        popularity, for logQ, popular negatives and the popularity baseline."""
        threshold = self.positive_threshold
        if threshold not in self._positive_counts:
            if not self.has_label and threshold <= 1.0:
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
        exclude_target_from_history: bool = False,
        history_max_len: int | None = None,
        context: dict[str, np.ndarray] | None = None,
    ) -> RecBatch:
        """A RecBatch of R = len(users) rows; the first B = len(labels) rows are labelled.

        users, items: (R,) int64 indices, -1 = no user / no item on that row. history_max_len:
        most recent history items per row (default: all the dataset keeps). With
        exclude_target_from_history the row's own item is removed from its history, so a model
        cannot learn "the target is in the history". context: per context feature, (C,) indices
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
                                                     exclude_target_from_history, history_max_len)
            lengths.append(spec_lengths.astype(np.int32, copy=False))
            values.append(spec_values.astype(np.int64, copy=False))
        kjt = KeyedJaggedTensor(
            keys=[spec.name for spec in self.sparse_features],
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
            stride=rows,
        )
        return RecBatch(
            dense_features=torch.from_numpy(self._dense(users, items)),
            sparse_features=kjt,
            labels=torch.from_numpy(labels),
            ratings=torch.from_numpy(ratings),
        )

    def _sparse(self, spec: FeatureSpec, users: np.ndarray, items: np.ndarray, context: dict, rows: int,
                exclude: bool, history_max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
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
            return self._history.last(index, max_len, items if exclude else None)
        if spec.name in (L.USER_ID, L.ITEM_ID):
            present = index >= 0
            return present.astype(np.int32), index[present]
        if spec.multi_hot:
            return self._multi[spec.name].rows(index)
        table = self._single[spec.name]
        values = np.where(index >= 0, table[np.where(index >= 0, index, 0)], -1)
        present = values >= 0  # hashed side features store -1 for a missing value
        return present.astype(np.int32), values[present]

    def _dense(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(R X F) standardised numeric features; 0 (the mean) where the row has no entity."""
        dense = np.zeros((len(users), len(self.dense_features)), np.float32)
        for column, spec in enumerate(self.dense_features):
            index = users if spec.entity == "user" else items
            present = index >= 0
            dense[present, column] = self._numeric[spec.name][index[present]]
        return dense


def check_indices(column: pa.Array | pa.ChunkedArray, low: int, high: int, path: Path, name: str) -> None:
    """Refuse (TrecError naming file and column) a column that is not integers in ``[low, high)`` without nulls."""
    if not pa.types.is_integer(column.type) or column.null_count:
        raise TrecError(f"{path}: column '{name}' must hold integer indices without nulls "
                        f"(found {column.type}, {column.null_count} nulls)")
    if len(column) == 0:
        return
    bounds = pc.min_max(column)
    smallest, largest = bounds["min"].as_py(), bounds["max"].as_py()
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise TrecError(f"{path}: column '{name}' holds index {bad}, outside {low}..{high - 1} "
                        f"(the file does not match {L.MANIFEST})")


def check_finite(column: pa.Array | pa.ChunkedArray, path: Path, name: str) -> None:
    """Refuse (TrecError naming file and column) a column that is not numbers, all finite, without nulls."""
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)) or column.null_count:
        raise TrecError(f"{path}: column '{name}' must hold numbers without nulls "
                        f"(found {column.type}, {column.null_count} nulls)")
    if pa.types.is_floating(column.type) and len(column):
        values = column.to_numpy() if isinstance(column, pa.Array) else column.combine_chunks().to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            raise TrecError(f"{path}: column '{name}' holds {values[bad][0]} at row {int(np.argmax(bad))} "
                            f"(labels and ratings must be finite; the file does not match {L.MANIFEST})")


@contextlib.contextmanager
def parquet_errors(path: Path) -> Iterator[None]:
    """Turn pyarrow's failure to read ``path`` (truncated, garbage, a column missing) into one TrecError line.

    A damaged shard of a prepared dataset or an export would otherwise end in a pyarrow traceback
    (or a multi-line message): the line names the file and quotes the first line of the cause.
    """
    try:
        yield
    except (pa.ArrowException, OSError, KeyError) as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrecError(f"{path}: truncated, corrupt or not the expected Parquet file ({quote(cause)}); "
                        "restore it or prepare/export again") from None


def _parquet_metadata(path: Path) -> pq.FileMetaData:
    with parquet_errors(path):
        return pq.ParquetFile(path).metadata


def _check_id_table(spec: FeatureSpec, rows: int, where: Path) -> None:
    """user_id / item_id index the user / item tables: their embedding tables must have a row for each."""
    if spec.kind != "categorical" or spec.multi_hot or spec.cardinality < rows:
        raise TrecError(f"{where}: feature '{spec.name}' must be single-valued categorical with cardinality >= "
                        f"{rows} (one row per {spec.entity}), got {spec.kind} with cardinality {spec.cardinality}")


def _check_manifest_fields(manifest: dict, root: Path, where: str) -> None:
    """Type-check the manifest (TrecError naming the field); every listed file must stay inside ``root``."""
    check_json_fields(manifest, _MANIFEST_FIELDS, where)
    for split, rows in manifest["counts"].items():
        if not _ROW_COUNT.accepts(rows):
            raise TrecError(f"{where}: field 'counts.{split}' must be {_ROW_COUNT.describe()}, got {quote(rows)}")
    for relative, entry in manifest["files"].items():
        path_inside(root, relative, where)
        if not isinstance(entry, dict):
            raise TrecError(f"{where}: field 'files.{relative}' must be an object, got {quote(entry)}")
        check_json_fields(entry, _FILE_FIELDS, f"{where}: files.{relative}")
    for entry in manifest["features"]:
        if isinstance(entry, dict) and entry.get("mapping_file") is not None:
            path_inside(root, entry["mapping_file"], f"{where}: feature {quote(entry.get('name'))}")


def _standardise(column: pa.ChunkedArray, spec: FeatureSpec) -> np.ndarray:
    """(x - mean) / std as float32; missing values (NaN) are filled with the mean, i.e. 0."""
    values = column.to_numpy().astype(np.float32)
    std = spec.std if spec.std else 1.0
    values = (values - np.float32(spec.mean or 0.0)) / np.float32(std)
    return np.nan_to_num(values, nan=0.0).astype(np.float32)


def verify_files(root: Path, files: dict) -> None:
    """Check every listed file's size and sha256 against the manifest."""
    for relative, entry in sorted(files.items()):
        path = root / relative
        if not path.is_file():
            raise TrecError(f"{path}: missing (listed in {L.MANIFEST})")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise TrecError(f"{path}: checksum mismatch (the file changed after `trec data prepare`)")


# --------------------------------------------------------------------------------------------
# the per-rank reader
# --------------------------------------------------------------------------------------------

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class InteractionReader:
    """An iterable of RecBatch over one split for one rank (see the module docstring).

    Each epoch the split's row groups are put in a seeded random order (``seed``, ``epoch``) and
    read as one long virtual sequence; rank r takes rows [r * P, (r + 1) * P) of it, with
    P = rows // world_size, so ranks read disjoint rows and every rank yields the same number
    of batches (at most world_size - 1 rows are left out per epoch, a different few each
    epoch). A rank reads its range in windows of ``window_rows`` rows and shuffles each window,
    so memory is bounded by a window, not the split. Batch k always starts at row k * batch_size
    of the rank's sequence, so a reader resumed from ``state_dict()`` continues exactly.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch_batches: int = 4,
        history_max_len: int = 100,
        exclude_target_from_history: bool = True,
        augment: Augment | None = None,
        drop_last: bool = True,
        window_rows: int = 1 << 20,
    ) -> None:
        if batch_size < 1:
            raise TrecError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise TrecError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = dataset
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.prefetch_batches = prefetch_batches
        self.history_max_len = history_max_len
        self.exclude_target_from_history = exclude_target_from_history
        self.augment = augment
        self.drop_last = drop_last
        self.window_rows = max(int(window_rows), 1)
        self.files = dataset.split_files(split)
        if not self.files:
            raise TrecError(f"{dataset.path}: no '{split}' split (splits: "
                            f"{', '.join(s for s in L.SPLITS if dataset.has_split(s))})")
        self._blocks = np.array([(f, g, meta.row_group(g).num_rows)
                                 for f, path in enumerate(self.files)
                                 for meta in [_parquet_metadata(path)]
                                 for g in range(meta.num_row_groups)], dtype=np.int64).reshape(-1, 3)
        self.num_rows = int(self._blocks[:, 2].sum())
        self.rows_per_rank = self.num_rows // world_size
        batches = self.rows_per_rank / batch_size
        self._len = math.floor(batches) if drop_last else math.ceil(batches)
        if self._len == 0:
            raise TrecError(f"split '{split}' has {self.num_rows} rows: too few for batch_size {batch_size} on "
                            f"{world_size} rank(s){' with drop_last' if drop_last else ''}")
        self._columns = [L.USER_ID, L.ITEM_ID, L.LABEL] + ([L.RATING] if dataset.has_rating else [])
        self._columns += dataset.context_names
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        return self._len

    # ---- position -----------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless the reader is already positioned in it."""
        if epoch != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= self._len:
            raise TrecError(f"reader state {state}: batch outside 0..{self._len} (was the batch size or world size changed?)")
        self.epoch, self.batch = epoch, batch

    # ---- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[RecBatch]:
        """The rest of the current epoch; afterwards the position moves to (epoch + 1, 0)."""
        epoch, start = self.epoch, self.batch
        produced = self._batches(epoch, start)
        source = produced if self.prefetch_batches <= 0 else _prefetch(produced, self.prefetch_batches)
        for batch in source:
            self.batch += 1  # counted before the yield: state_dict() in the loop body includes this batch
            yield batch
        self.epoch, self.batch = epoch + 1, 0

    def _batches(self, epoch: int, start: int) -> Iterator[RecBatch]:
        size = self.batch_size
        index = start
        pending: list[dict[str, np.ndarray]] = []
        held = 0
        for chunk in self._rows(epoch, start * size):
            pending.append(chunk)
            held += len(chunk[L.USER_ID])
            if held < size:
                continue
            merged = _concat(pending)
            offset = 0
            while held - offset >= size and index < self._len:
                yield self._make_batch({k: v[offset : offset + size] for k, v in merged.items()}, epoch, index)
                offset += size
                index += 1
            pending = [{k: v[offset:] for k, v in merged.items()}]
            held -= offset
        if index < self._len and held > 0:  # drop_last=False: the short last batch
            yield self._make_batch(_concat(pending), epoch, index)

    def _make_batch(self, rows: dict[str, np.ndarray], epoch: int, index: int) -> RecBatch:
        users, items, labels = rows[L.USER_ID], rows[L.ITEM_ID], rows[L.LABEL]
        ratings = rows.get(L.RATING, np.zeros(len(labels), np.float32))
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, self.rank, index])
            users, items, labels, ratings = self.augment(users, items, labels, ratings, rng)
        context = {name: rows[name] for name in self.dataset.context_names}
        return self.dataset.build_batch(users, items, labels, ratings, self.exclude_target_from_history,
                                        self.history_max_len, context)

    def _block_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._blocks))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._blocks))

    def _rows(self, epoch: int, start_row: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows from ``start_row`` on, window by window (each window shuffled)."""
        order = self._block_order(epoch)
        bounds = np.concatenate([[0], np.cumsum(self._blocks[order, 2])])
        base = self.rank * self.rows_per_rank
        window = start_row // self.window_rows
        files: dict[int, pq.ParquetFile] = {}
        while window * self.window_rows < self.rows_per_rank:
            low = window * self.window_rows
            high = min(low + self.window_rows, self.rows_per_rank)
            chunk = self._read(order, bounds, base + low, base + high, files)
            if self.shuffle:
                permutation = np.random.default_rng([self.seed, epoch, self.rank, window]).permutation(high - low)
                chunk = {k: v[permutation] for k, v in chunk.items()}
            skip = max(start_row - low, 0)
            yield {k: v[skip:] for k, v in chunk.items()} if skip else chunk
            window += 1

    def _read(self, order: np.ndarray, bounds: np.ndarray, low: int, high: int,
              files: dict[int, pq.ParquetFile]) -> dict[str, np.ndarray]:
        """Rows [low, high) of the epoch's virtual sequence (blocks in ``order``)."""
        first = int(np.searchsorted(bounds, low, side="right")) - 1
        last = int(np.searchsorted(bounds, high, side="left"))
        parts = []
        for position in range(first, last):
            file_index, group, _ = self._blocks[order[position]]
            with parquet_errors(self.files[file_index]):
                if file_index not in files:
                    files[int(file_index)] = pq.ParquetFile(self.files[file_index])
                table = files[int(file_index)].read_row_group(int(group), columns=self._columns)
            begin = max(low - bounds[position], 0)
            end = min(high, bounds[position + 1]) - bounds[position]
            part = table.slice(int(begin), int(end - begin))
            self.dataset.check_split_rows(part, self.files[file_index])
            parts.append(part)
        table = pa.concat_tables(parts)
        return {name: table[name].to_numpy() for name in self._columns}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _prefetch(batches: Iterator[RecBatch], depth: int) -> Iterator[RecBatch]:
    """Run ``batches`` in a background thread, ``depth`` batches ahead; errors are re-raised here.

    Leaving the loop early (break, exception) stops the thread before it reads further.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_END)
        except BaseException as error:  # forwarded to the consumer, which re-raises it
            slots.put(_Failure(error))

    thread = threading.Thread(target=work, name="trec-reader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def iter_index_batches(num: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[np.ndarray]:
    """This rank's disjoint slice of 0..num-1 in (batch_size,) int64 batches, padded with -1.

    Every rank yields ceil(ceil(num / world_size) / batch_size) batches — the same number — so
    collective calls (all-to-all of sharded embeddings) never wait on a rank that finished.
    The caller drops the -1 padding.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise TrecError(f"iter_index_batches: bad batch_size {batch_size} / rank {rank} of {world_size}")
    per_rank = -(-num // world_size)
    low = min(rank * per_rank, num)
    high = min(low + per_rank, num)
    for batch in range(-(-per_rank // batch_size)):
        out = np.full(batch_size, -1, np.int64)
        indices = np.arange(low + batch * batch_size, min(low + (batch + 1) * batch_size, high), dtype=np.int64)
        out[: len(indices)] = indices
        yield out
