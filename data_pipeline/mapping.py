"""ID mapping per feature: raw value → contiguous index (``vocab``, ``managed``) or stable hash bucket (``hash``).

vocab
    Indices 0..N-1 by descending count, ties by raw value (so the mapping is deterministic);
    index N is the out-of-vocabulary (OOV) index, so a table needs N + 1 rows. Values seen
    fewer than ``min_count`` times are left out of the vocabulary.
hash
    ``stable_hash(raw) % buckets``: a fixed 64-bit hash (never Python's per-process salted
    ``hash()``), so the same raw ID gets the same bucket in every process and every run.
    Cardinality = buckets; no OOV. The mapping file still records raw → bucket for seen IDs.

managed (user_id / item_id only)
    Catalog indices 0..N-1 as vocab (no OOV: every seen ID is in the catalog), plus each ID's
    ``managed_id = stable_hash(raw) % 2**40``: what the model sees. Its managed-collision
    remapper (:mod:`trec.models.managed`) gives rows of a table of ``zch_size`` rows to IDs as
    they stream in; the catalog index only keys the dataset's own bookkeeping (splits,
    exclusions, negatives, export), never a table row.

All write ``mappings/<feature>.parquet`` with columns ``raw`` (int64 or string, as in the
source), ``index`` int64 and ``count`` int64 (managed: and ``managed_id`` int64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
MANAGED_ID_BITS = 40
"""managed: raw IDs hash into [0, 2**40), the input range of the model's managed-collision modules."""


class ValueCounter:
    """Occurrences of each raw value, merged across batches; memory O(distinct values)."""

    # Partial counts are merged once this many (value, count) rows have piled up.
    _MERGE_ROWS = 4_000_000

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._rows = 0

    def add(self, values: pa.Array) -> None:
        """Count the non-null values of one batch."""
        counts = pc.value_counts(values.drop_null())
        part = pa.table({"raw": counts.field("values"), "count": counts.field("counts")})
        self._parts.append(part)
        self._rows += part.num_rows
        if self._rows > self._MERGE_ROWS:
            merged = self._merge()
            self._parts, self._rows = [merged], merged.num_rows

    def _merge(self) -> pa.Table:
        table = pa.concat_tables(self._parts)
        grouped = table.group_by("raw").aggregate([("count", "sum")])
        return pa.table({"raw": grouped["raw"], "count": grouped["count_sum"]})

    def result(self, value_type: pa.DataType = pa.string()) -> pa.Table:
        """``raw``, ``count``, sorted by descending count then raw value."""
        if not self._parts:
            return pa.table({"raw": pa.array([], value_type), "count": pa.array([], pa.int64())})
        return self._merge().sort_by([("count", "descending"), ("raw", "ascending")])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective 64-bit mixer (uint64 arithmetic wraps by design)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def stable_hash(values: pa.Array) -> np.ndarray:
    """uint64 hash of int64 or string values, identical across processes, runs and machines.

    Integers: splitmix64 of the two's-complement value. Strings: FNV-1a over the UTF-8 bytes,
    then splitmix64. Vectorised over rows, looping over byte positions (IDs are short).
    """
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_integer(values.type):
        return _splitmix64(values.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64))
    values = values.cast(pa.large_string())
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset : values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8) if values.buffers()[2] else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashed = np.full(len(values), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for position in range(int(lengths.max()) if len(lengths) else 0):
            rows = np.flatnonzero(lengths > position)
            hashed[rows] = (hashed[rows] ^ data[starts[rows] + position].astype(np.uint64)) * _FNV_PRIME
    return _splitmix64(hashed)


@dataclass
class Mapping:
    """The mapping of one categorical feature (see the module docstring)."""

    feature: str
    kind: str
    """'vocab', 'hash' or 'managed'."""
    counts: pa.Table
    """Every seen raw value with its count (``raw``, ``count``), sorted by count then raw."""
    size: int
    """vocab, managed: N values in the vocabulary (catalog); hash: number of buckets."""
    zch_size: int = 0
    """managed: rows of the model's table (its managed-collision remapper's output range)."""

    @property
    def cardinality(self) -> int:
        """Embedding-table rows the feature needs: N + 1 (vocab, with OOV) or buckets (hash)."""
        return self.size + 1 if self.kind == "vocab" else self.size

    @property
    def oov_index(self) -> int | None:
        return self.size if self.kind == "vocab" else None  # managed: every seen ID is in the catalog

    @property
    def raw_type(self) -> pa.DataType:
        return self.counts.schema.field("raw").type

    @property
    def vocabulary(self) -> pa.Array:
        """vocab, managed: raw values in index order (index i ↦ vocabulary[i])."""
        return self.counts["raw"].slice(0, self.size).combine_chunks()

    def lookup(self, values: pa.Array, unknown: int | None = None) -> np.ndarray:
        """int64 indices of raw ``values``; values outside the vocabulary get ``unknown``
        (default: the OOV index). Nulls get ``unknown`` too (hash included)."""
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        fallback = self.oov_index if unknown is None else unknown
        if self.kind == "hash":
            out = (stable_hash(values.fill_null(_null_fill(values.type))) % np.uint64(self.size)).astype(np.int64)
            if values.null_count:
                out[values.is_null().to_numpy(zero_copy_only=False)] = -1 if fallback is None else fallback
            return out
        found = pc.index_in(values.cast(self.raw_type), value_set=self.vocabulary)
        return found.fill_null(-1 if fallback is None else fallback).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    def table(self) -> pa.Table:
        """The mapping file: raw, index, count (vocab: in index order; hash: by count)."""
        raw = self.counts["raw"]
        if self.kind in ("vocab", "managed"):
            raw = raw.slice(0, self.size)
            index = pa.array(np.arange(self.size, dtype=np.int64))
            count = self.counts["count"].slice(0, self.size)
            if self.kind == "managed":
                return pa.table({"raw": raw, "index": index, "count": count.cast(pa.int64()),
                                 "managed_id": pa.array(managed_ids(raw.combine_chunks()))})
        else:
            index = pa.array(self.lookup(raw.combine_chunks()))
            count = self.counts["count"]
        return pa.table({"raw": raw, "index": index, "count": count.cast(pa.int64())})


def managed_ids(values: pa.Array) -> np.ndarray:
    """int64 IDs in [0, 2**40) the model's managed-collision remapper receives for raw ``values``."""
    return (stable_hash(values) & np.uint64((1 << MANAGED_ID_BITS) - 1)).astype(np.int64)


def _null_fill(kind: pa.DataType) -> object:
    return 0 if pa.types.is_integer(kind) else ""


def build_mapping(feature: str, counts: pa.Table, kind: str, min_count: int = 1, buckets: int = 0,
                  zch_size: int = 0) -> Mapping:
    """A vocab or managed (values with count >= min_count, in ``counts`` order) or a hash mapping."""
    if kind == "hash":
        return Mapping(feature, "hash", counts, buckets)
    kept = int(pc.sum(pc.greater_equal(counts["count"], max(min_count, 1))).as_py() or 0)
    return Mapping(feature, kind, counts, kept, zch_size if kind == "managed" else 0)


def representatives(mapping: Mapping) -> pa.Array:
    """Raw value standing for each index 0..size-1: the vocabulary itself, or for hash buckets the
    most frequent raw ID of the bucket (ties by raw value; null for an empty bucket)."""
    if mapping.kind in ("vocab", "managed"):
        return mapping.vocabulary
    raw = mapping.counts["raw"].combine_chunks()
    buckets = mapping.lookup(raw)
    # counts are sorted by descending count then raw: the first row of each bucket wins.
    seen, first = np.unique(buckets, return_index=True)
    rows = np.full(mapping.size, -1, dtype=np.int64)
    rows[seen] = first
    if len(raw) == 0:
        return pa.nulls(mapping.size, raw.type)
    taken = raw.take(pa.array(np.maximum(rows, 0)))
    return pc.if_else(pa.array(rows < 0), pa.scalar(None, raw.type), taken)
