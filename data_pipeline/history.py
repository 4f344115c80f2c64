"""Each user's most recent train items, gathered while the train split is written.

The caller adds only positive rows (label >= ``layout.DEFAULT_POSITIVE_THRESHOLD``): the
``user_history`` feature lists what the user liked, not every item shown to them.

Memory stays O(min(users × max_len, train rows)) at 16 bytes a row (user and item as int32
when they fit, time int64): the buffer is compacted to the newest ``max_len`` items per user
whenever it grows past a bound. Rows arrive in source order and every sort here is stable,
so ties in time keep source order without storing it.
"""

from __future__ import annotations

import numpy as np


class HistoryCollector:
    """Per user, the ``max_len`` latest train items by (timestamp, source order)."""

    def __init__(self, num_users: int, max_len: int, num_items: int, compact_rows: int = 8_000_000) -> None:
        self.num_users = num_users
        self.max_len = max_len
        self.compact_rows = max(compact_rows, 2 * num_users)
        self._user_type = np.int32 if num_users < 2**31 else np.int64
        self._item_type = np.int32 if num_items < 2**31 else np.int64
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rows = 0

    def add(self, users: np.ndarray, items: np.ndarray, times: np.ndarray) -> None:
        """Rows must come in source order (each call after the previous one's rows)."""
        self._parts.append((users.astype(self._user_type), items.astype(self._item_type), times.astype(np.int64)))
        self._rows += len(users)
        if self._rows > self.compact_rows:
            self._parts = [self._compact()]
            self._rows = len(self._parts[0][0])
            # Compaction cannot shrink below users × max_len; grow the bound so it is not redone per batch.
            self.compact_rows = max(self.compact_rows, 2 * self._rows)

    def _compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stable sort by (user, time) and keep each user's last max_len rows."""
        users, items, times = (np.concatenate(column) for column in zip(*self._parts))
        self._parts = []
        order = np.lexsort((times, users))
        users, items, times = users[order], items[order], times[order]
        del order
        ends = np.cumsum(np.bincount(users, minlength=self.num_users))
        keep = (ends[users] - np.arange(len(users))) <= self.max_len  # 1 = the user's newest row
        return users[keep], items[keep], times[keep]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR: offsets (num_users + 1,) and items, each user's oldest first, newest last."""
        if not self._parts:
            return np.zeros(self.num_users + 1, np.int64), np.zeros(0, np.int64)
        users, items, _ = self._compact()
        offsets = np.zeros(self.num_users + 1, np.int64)
        np.cumsum(np.bincount(users, minlength=self.num_users), out=offsets[1:])
        return offsets, items.astype(np.int64)
