"""Train/val/test assignment that streams: per-user state only, never the whole log in memory.

The prepare job shows the splitter every interaction twice, in the same order and the same
batches: :meth:`Splitter.observe` gathers statistics (interactions per user, the latest
timestamps), then :meth:`Splitter.assign` labels each row ``TRAIN``, ``VAL`` or ``TEST``.

stratified
    Per user, exactly ``t_u = n_u - round(n_u * (1 - test_fraction))`` of the user's ``n_u``
    interactions go to test, chosen uniformly at random (seeded); a user with >= 2 interactions
    keeps at least one in train and one in test. This is Microsoft recommenders'
    ``python_stratified_split(ratio=1 - test_fraction)``. Streaming is exact: each batch draws
    how many of a user's rows it holds are test rows from the hypergeometric distribution of
    the user's remaining rows and remaining test slots, then picks those rows at random —
    the same law as shuffling all of the user's rows at once.
temporal
    One global cut: rows with ``timestamp >= T`` are test, ``T`` being the timestamp at the
    ``1 - test_fraction`` quantile (rows tied at ``T`` all go to test). Holds the timestamp
    column (8 bytes per interaction) in memory to find ``T`` exactly.
leave-last-n
    Per user, the ``last_n`` latest interactions (by timestamp, ties by source order) go to
    test, keeping at least one in train.

val (any kind): per user, ``round(train_u * val_fraction)`` random rows of the user's train
part (at least one train row is always kept), drawn the same hypergeometric way.
"""

from __future__ import annotations

import numpy as np

from data_pipeline import layout as L
from trec.config import PrepareConfig, SplitKind
from trec.errors import TrecError

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = dict(enumerate(L.SPLITS))  # code → name, in the order of TRAIN, VAL, TEST


def round_half_even(values: np.ndarray) -> np.ndarray:
    """Python's and pandas' round(): halves go to the even neighbour (0.5 → 0, 1.5 → 2)."""
    return np.round(values).astype(np.int64)


def stratified_test_counts(n: np.ndarray, test_fraction: float) -> np.ndarray:
    """Test rows per user: n - round(n * (1 - f)), clamped to [1, n - 1] for users with n >= 2."""
    test = n - round_half_even(n * (1.0 - test_fraction))
    if test_fraction > 0:
        test = np.where(n >= 2, np.clip(test, 1, np.maximum(n - 1, 1)), 0)
    return test.astype(np.int64)


def val_counts(train: np.ndarray, val_fraction: float) -> np.ndarray:
    """Val rows per user carved from its train rows, leaving at least one train row."""
    val = round_half_even(train * val_fraction)
    return np.clip(val, 0, np.maximum(train - 1, 0)).astype(np.int64)


def draw_per_user(rng: np.random.Generator, users: np.ndarray, remaining: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Choose rows of this batch for a per-user quota, consuming the streaming state in place.

    users: (R,) user index of each eligible row. remaining[u]: the user's eligible rows not yet
    seen (this batch included); slots[u]: how many of them must still be chosen.
    Returns a (R,) bool mask of the chosen rows.
    """
    if len(users) == 0:
        return np.zeros(0, dtype=bool)
    unique, inverse, seen = np.unique(users, return_inverse=True, return_counts=True)
    good = slots[unique]
    chosen_per_user = rng.hypergeometric(good, remaining[unique] - good, seen)
    # Which of a user's rows in this batch: a random order within each user, first k chosen.
    # One int64 sort key (user group in the high bits, random low bits) sorts far faster than lexsort.
    key = (inverse.astype(np.int64) << 32) | rng.integers(0, 1 << 32, len(users), dtype=np.int64)
    order = np.argsort(key)
    group_start = np.repeat(np.cumsum(seen) - seen, seen)
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - group_start
    remaining[unique] -= seen
    slots[unique] -= chosen_per_user
    return rank < chosen_per_user[inverse]


class _LatestPerUser:
    """Each user's ``n`` latest (timestamp, seq) keys, kept in O(users × n) memory."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.users = np.zeros(0, np.int64)
        self.times = np.zeros(0, np.int64)
        self.seqs = np.zeros(0, np.int64)

    def add(self, users: np.ndarray, times: np.ndarray, seqs: np.ndarray) -> None:
        users = np.concatenate([self.users, users])
        times = np.concatenate([self.times, times])
        seqs = np.concatenate([self.seqs, seqs])
        order = np.lexsort((-seqs, -times, users))  # per user, latest first
        users, times, seqs = users[order], times[order], seqs[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
        keep = rank < self.n
        self.users, self.times, self.seqs = users[keep], times[keep], seqs[keep]

    def kth_latest(self, num_users: int, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per user, the k-th latest key (k >= 1); (int64 max, int64 max) where k == 0."""
        big = np.iinfo(np.int64).max
        time = np.full(num_users, big, np.int64)
        seq = np.full(num_users, big, np.int64)
        starts = np.flatnonzero(np.r_[True, self.users[1:] != self.users[:-1]]) if len(self.users) else []
        for_user = self.users[starts] if len(self.users) else np.zeros(0, np.int64)
        want = k[for_user]
        has = want > 0
        rows = np.asarray(starts)[has] + want[has] - 1
        time[for_user[has]] = self.times[rows]
        seq[for_user[has]] = self.seqs[rows]
        return time, seq


class Splitter:
    """Streaming train/val/test assignment (see the module docstring). Call order:
    ``observe`` over every batch, ``finish_observing``, then ``assign`` over the same batches."""

    def __init__(self, options: PrepareConfig, num_users: int) -> None:
        if not 0.0 <= options.test_fraction < 1.0:
            raise TrecError(f"test_fraction must be in [0, 1), got {options.test_fraction}")
        if not 0.0 <= options.val_fraction < 1.0:
            raise TrecError(f"val_fraction must be in [0, 1), got {options.val_fraction}")
        if options.split == SplitKind.leave_last_n and options.last_n < 1:
            raise TrecError(f"last_n must be >= 1 for the leave-last-n split, got {options.last_n}")
        self.kind = SplitKind(options.split)
        self.options = options
        self.num_users = num_users
        self.rng = np.random.default_rng(options.seed)
        self.counts = np.zeros(num_users, np.int64)
        self._latest = _LatestPerUser(options.last_n) if self.kind == SplitKind.leave_last_n else None
        self._times: list[np.ndarray] = []
        self._cut = None
        self.needs_train_counts = self.kind == SplitKind.temporal and options.val_fraction > 0

    def describe(self) -> dict:
        info = {"kind": str(self.kind), "seed": self.options.seed, "val_fraction": self.options.val_fraction}
        if self.kind == SplitKind.leave_last_n:
            info["last_n"] = self.options.last_n
        else:
            info["test_fraction"] = self.options.test_fraction
        if self.kind == SplitKind.temporal:
            info["cut_timestamp"] = None if self._cut is None else int(self._cut)
        return info

    # ---- pass 1: statistics -------------------------------------------------------------

    def observe(self, users: np.ndarray, times: np.ndarray, seqs: np.ndarray) -> None:
        self.counts += np.bincount(users, minlength=self.num_users)
        if self._latest is not None:
            self._latest.add(users, times, seqs)
        if self.kind == SplitKind.temporal:
            self._times.append(times.astype(np.int64, copy=True))

    def finish_observing(self) -> None:
        """Fix the test quota (or thresholds) per user; temporal: find the cut T."""
        n = self.counts
        if self.kind == SplitKind.stratified:
            self.test_quota = stratified_test_counts(n, self.options.test_fraction)
            self._remaining = n.copy()
        elif self.kind == SplitKind.leave_last_n:
            self.test_quota = np.minimum(self.options.last_n, np.maximum(n - 1, 0))
            self._cut_time, self._cut_seq = self._latest.kth_latest(self.num_users, self.test_quota)
            self._latest = None
        else:
            times = np.concatenate(self._times) if self._times else np.zeros(0, np.int64)
            self._times = []
            k = int(round_half_even(np.array(len(times) * self.options.test_fraction)))
            self._cut = np.partition(times, len(times) - k)[len(times) - k] if k > 0 else None
            self.test_quota = None
            self._train_counts = np.zeros(self.num_users, np.int64)
            self._start_val(None)
            return
        self._start_val(n - self.test_quota)

    def observe_train(self, users: np.ndarray, times: np.ndarray) -> None:
        """Temporal with val only: a second statistics pass counting each user's train rows."""
        train = users if self._cut is None else users[times < self._cut]
        self._train_counts += np.bincount(train, minlength=self.num_users)

    def finish_train_counts(self) -> None:
        self._start_val(self._train_counts)

    def _start_val(self, train: np.ndarray | None) -> None:
        if train is None or self.options.val_fraction <= 0:
            self._val_slots = None
            return
        self._val_slots = val_counts(train, self.options.val_fraction)
        self._val_remaining = train.copy()

    # ---- pass 2: assignment -------------------------------------------------------------

    def assign(self, users: np.ndarray, times: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """(R,) uint8 split codes (TRAIN, VAL, TEST) for one batch, in the observed order."""
        if self.kind == SplitKind.stratified:
            test = draw_per_user(self.rng, users, self._remaining, self.test_quota)
        elif self.kind == SplitKind.leave_last_n:
            cut_time, cut_seq = self._cut_time[users], self._cut_seq[users]
            test = (times > cut_time) | ((times == cut_time) & (seqs >= cut_seq))
        else:
            test = np.zeros(len(users), bool) if self._cut is None else times >= self._cut
        split = np.where(test, TEST, TRAIN).astype(np.uint8)
        if self._val_slots is not None:
            train_rows = np.flatnonzero(~test)
            val = draw_per_user(self.rng, users[train_rows], self._val_remaining, self._val_slots)
            split[train_rows[val]] = VAL
        return split
