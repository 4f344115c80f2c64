"""Each user's most recent train items, gathered while the train split is written.

The caller adds only positive rows (label >= ``layout.DEFAULT_POSITIVE_THRESHOLD``): the
``user_history`` feature lists what the user liked, not every item shown to them.

In memory, rows take 16 bytes (user and item as int32 when they fit, time int64): the buffer is
compacted to the newest ``max_len`` items per user whenever it grows past a bound, so it holds
O(min(users × max_len, train rows)). Rows arrive in source order and every sort here is stable,
so ties in time keep source order without storing it.

With ``spill_dir``, memory stays bounded however many rows come: once the compacted buffer still
holds more than ``spill_rows`` rows, it is appended to ``buckets`` scratch Parquet files by user
range, and :meth:`result` builds the history one bucket at a time (each at most
users/buckets × max_len kept rows), holding the finished buckets' items (4 bytes per kept item
while items fit int32), then the int64 CSR (8 bytes per kept item, 12 while the buckets are merged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trec.io import streaming_parquet


class HistoryCollector:
    """Per user, the ``max_len`` latest train items by (timestamp, source order)."""

    def __init__(self, num_users: int, max_len: int, num_items: int, compact_rows: int = 8_000_000,
                 spill_dir: Path | None = None, spill_rows: int = 4_000_000, buckets: int = 64) -> None:
        self.num_users = num_users
        self.max_len = max_len
        self.num_items = num_items
        self.compact_rows = self._first_bound = max(compact_rows, 2 * num_users)
        self._user_type = np.int32 if num_users < 2**31 else np.int64
        self._item_type = np.int32 if num_items < 2**31 else np.int64
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rows = 0
        self._spill = _Spill(Path(spill_dir), num_users, buckets) if spill_dir is not None else None
        self.spill_rows = spill_rows

    def add(self, users: np.ndarray, items: np.ndarray, times: np.ndarray) -> None:
        """Rows must come in source order (each call after the previous one's rows)."""
        self._parts.append((users.astype(self._user_type), items.astype(self._item_type), times.astype(np.int64)))
        self._rows += len(users)
        if self._rows > self.compact_rows:
            self._parts = [self._compact()]
            self._rows = len(self._parts[0][0])
            if self._spill is not None and self._rows > self.spill_rows:
                self._spill.write(*self._parts.pop())
                self._rows, self.compact_rows = 0, self._first_bound
                return
            # Compaction cannot shrink below users × max_len; grow the bound so it is not redone per batch.
            self.compact_rows = max(self.compact_rows, 2 * self._rows)

    def _compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stable sort by (user, time) and keep each user's last max_len rows."""
        users, items, times = (np.concatenate(column) for column in zip(*self._parts))
        self._parts = []
        order = np.lexsort((times, users))
        # One column at a time: the old and new copies of a single column are alive together, not all three.
        users = users[order]
        items = items[order]
        times = times[order]
        del order
        ends = np.cumsum(np.bincount(users, minlength=self.num_users))
        keep = (ends[users] - np.arange(len(users))) <= self.max_len  # 1 = the user's newest row
        return users[keep], items[keep], times[keep]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR: offsets (num_users + 1,) and items, each user's oldest first, newest last."""
        if self._spill is not None and self._spill.rows:
            if self._parts:
                self._spill.write(*self._compact())
            return self._spill.result(self)
        offsets = np.zeros(self.num_users + 1, np.int64)
        if not self._parts:
            return offsets, np.zeros(0, np.int64)
        users, items, _ = self._compact()
        np.cumsum(np.bincount(users, minlength=self.num_users), out=offsets[1:])
        return offsets, items.astype(np.int64)


class _Spill:
    """Scratch Parquet files of history rows, one per user range, in source order within each."""

    def __init__(self, directory: Path, num_users: int, buckets: int) -> None:
        self.directory = directory
        self.num_users = num_users
        self.buckets = max(1, min(buckets, num_users))
        self.rows = 0
        self._writers: dict[int, pq.ParquetWriter] = {}

    def _path(self, bucket: int) -> Path:
        return self.directory / f"history-spill-{bucket:04d}.parquet"

    def write(self, users: np.ndarray, items: np.ndarray, times: np.ndarray) -> None:
        bucket = users.astype(np.int64) * self.buckets // self.num_users
        order = np.argsort(bucket, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(bucket, minlength=self.buckets))]
        for b in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[b] : bounds[b + 1]]
            table = pa.table({"user": users[rows], "item": items[rows], "time": times[rows]})
            if b not in self._writers:
                # No dictionary encoding: each open writer's dictionary encoders held about 6 MB (0.4 GB for 64).
                self._writers[b] = pq.ParquetWriter(self._path(b), table.schema, compression="lz4",
                                                    use_dictionary=False)
            self._writers[b].write_table(table)
        self.rows += len(users)

    def result(self, owner: HistoryCollector) -> tuple[np.ndarray, np.ndarray]:
        """Each bucket through an in-memory collector: buckets are user ranges, so their items
        concatenate in user order."""
        for writer in self._writers.values():
            writer.close()
        lengths = np.zeros(owner.num_users, np.int64)
        items = []
        for b in sorted(self._writers):
            part = HistoryCollector(owner.num_users, owner.max_len, owner.num_items, owner._first_bound)
            for batch in streaming_parquet(self._path(b)).iter_batches(batch_size=1 << 20):
                part.add(*(batch.column(name).to_numpy() for name in ("user", "item", "time")))
            offsets, bucket_items = part.result()
            lengths += np.diff(offsets)
            items.append(bucket_items.astype(owner._item_type))  # int32 until merged: 4 bytes a kept item
            self._path(b).unlink()
        offsets = np.zeros(owner.num_users + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets, _merge(items, int(offsets[-1]))


def _merge(parts: list[np.ndarray], total: int) -> np.ndarray:
    """``parts`` concatenated as int64, each freed once copied (the list is emptied): 12 bytes a kept
    item at the peak instead of np.concatenate's 16."""
    merged = np.empty(total, np.int64)
    at = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        merged[at : at + len(part)] = part
        at += len(part)
        del part
    return merged
