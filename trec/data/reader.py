"""The per-rank reader: :class:`InteractionReader` (a split → prefetched :class:`RecBatch` es) and
:func:`iter_index_batches` (a rank's slice of an index range, for encoding users or items)."""

from __future__ import annotations

import math
import queue
import threading
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import layout as L
from trec.data.batch import Augment, RecBatch
from trec.data.checks import parquet_errors, parquet_metadata
from trec.data.dataset import PreparedDataset
from trec.errors import TrecError
from trec.io import streaming_parquet

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class InteractionReader:
    """An iterable of RecBatch over one split for one rank (see :mod:`trec.data`).

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
                                 for meta in [parquet_metadata(path)]
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
        targets = items
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, self.rank, index])
            users, items, labels, ratings = self.augment(users, items, labels, ratings, rng)
            history_rows = getattr(self.augment, "history_rows", None)  # sampled rows read their positive's
            targets = targets[history_rows(len(targets))] if history_rows is not None else items
        context = {name: rows[name] for name in self.dataset.context_names}
        return self.dataset.build_batch(users, items, labels, ratings,
                                        targets if self.exclude_target_from_history else None,
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
                    files[int(file_index)] = streaming_parquet(self.files[file_index])
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
