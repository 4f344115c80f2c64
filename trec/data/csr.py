"""One compressed-sparse-row type (:class:`Csr`) and the one home of the (row, column) key arithmetic.

A CSR maps row r (a user, an item) to a variable-length run of values (items, history, genres).
A (row, column) pair packs into one int64 key ``row * num_columns + column``: sorted keys are
what ``torch.isin`` / ``np.searchsorted`` look up, and a key also indexes a flattened
``rows X num_columns`` score matrix (``scores.view(-1)[keys]``). Every such key is made by
:func:`pair_key` and unpacked by :func:`key_rows`, never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def pair_key(rows: Array, columns: Array, num_columns: int) -> Array:
    """int64 keys ``rows * num_columns + columns`` (numpy arrays or torch tensors, broadcast)."""
    return rows * num_columns + columns


def key_rows(keys: Array, num_columns: int) -> Array:
    """The row of each key made by :func:`pair_key` (numpy arrays or torch tensors)."""
    return keys // num_columns


def gather_ranges(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate values[starts[r] : starts[r] + lengths[r]] over rows r, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=values.dtype)
    out_starts = np.cumsum(lengths) - lengths
    positions = np.repeat(starts - out_starts, lengths) + np.arange(total)
    return values[positions]


@dataclass(frozen=True, eq=False)
class Csr:
    """R rows of values: row r holds ``values[offsets[r] : offsets[r + 1]]``.

    offsets: (R+1,) int64, non-decreasing, offsets[0] == 0.
    values: (N,) with N = offsets[-1] (int64 items or indices; any dtype for :meth:`pairs`).

    Row arguments (``index``, ``rows``) are (K,) int64 row numbers where -1 means an empty row
    (a padding row, an item-only row). The arrays may be shared (cached by the dataset): never
    modify them in place.
    """

    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> "Csr":
        """A list column (one row per list; a null list is empty) as int64 values."""
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

    @classmethod
    def from_keys(cls, keys: np.ndarray, num_rows: int, num_columns: int) -> "Csr":
        """The inverse of :meth:`all_keys`: sorted keys (:func:`pair_key`) → ``num_rows`` rows of int64 values."""
        rows, values = np.divmod(keys, num_columns)
        offsets = np.zeros(num_rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=offsets[1:])
        return cls(offsets, values.astype(np.int64))

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(R,) int64 values per row."""
        return np.diff(self.offsets)

    def row(self, r: int) -> np.ndarray:
        """Row ``r``'s values (a view)."""
        return self.values[self.offsets[r] : self.offsets[r + 1]]

    def _spans(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of rows ``index``; -1 → length 0."""
        present = index >= 0
        safe = np.where(present, index, 0)
        starts = self.offsets[safe]
        return starts, np.where(present, self.offsets[safe + 1] - starts, 0)

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (K,), values) of rows ``index``: a jagged (KJT-style) gather."""
        starts, lengths = self._spans(index)
        return lengths, gather_ranges(self.values, starts, lengths)

    def pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, values) of every value of rows ``rows``: positions (P,) index into ``rows``."""
        starts, lengths = self._spans(rows)
        return np.repeat(np.arange(len(rows)), lengths), gather_ranges(self.values, starts, lengths)

    def keys(self, rows: np.ndarray, num_columns: int) -> np.ndarray:
        """(P,) sorted int64 keys ``position * num_columns + value`` of rows ``rows`` (position into
        ``rows``): the flat indices of those values in a ``len(rows) X num_columns`` matrix."""
        return np.sort(pair_key(*self.pairs(rows), num_columns))

    def all_keys(self, num_columns: int) -> np.ndarray:
        """(N,) sorted int64 keys ``row * num_columns + value`` of every row (see :meth:`from_keys`)."""
        rows = np.repeat(np.arange(self.num_rows, dtype=np.int64), self.lengths)
        return np.sort(pair_key(rows, self.values, num_columns))

    def last(self, index: np.ndarray, max_len: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row's last ``max_len`` values (oldest first), without the row's ``exclude`` value:
        (lengths (K,), values), like :meth:`rows`.

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
