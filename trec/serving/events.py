"""The durable log of feedback events (``POST /feedback``): JSON-lines write-ahead files rotated into Parquet.

Layout (every worker of ``trec serve --workers N`` writes into the same directory; ``trec serve --events
EVENTS`` uses ``EVENTS/HOSTNAME/``, so replicas on several hosts never share a name)::

    DIR/events-20261202T041720-1234-7.parquet   complete files, one per rotation (the only *.parquet names)
    DIR/.wal-1234-8.jsonl                       the write-ahead file of live writer pid 1234 (flock-ed)
    DIR/.events-...-1234-8.parquet.<uuid>.tmp   a rotation being written (never a *.parquet name)

Columns: user_id, item_id, event (string), label (float32 in [0, 1]), timestamp (int64 unix seconds),
experiment, arm and one per context name (nullable strings). Train on it with (``--context-features
NAME,...`` for context columns; every *.parquet under DIR is read, recursively)::

    trec data prepare parquet --source DIR --out DATA --label-col label --time-col timestamp

A WAL no live writer holds is converted to Parquet by the next EventLog opened on DIR; a WAL and its
Parquet file share PID-SEQ, so a writer killed after the rename, before deleting its WAL, is not recovered twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from trec.errors import TrecError
from trec.io import atomic_path, quote

log = logging.getLogger("trec.serving")

DEFAULT_EVENT_LABELS = {"purchase": 1.0, "like": 0.9, "click": 0.5, "view": 0.4, "dislike": 0.0}
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
FIXED_COLUMNS = ("user_id", "item_id", "event", "label", "timestamp", "experiment", "arm")
_WAL = re.compile(r"\.wal-(\d+)-(\d+)\.jsonl")
_PARQUET = re.compile(r"events-\d{8}T\d{6}-(\d+)-(\d+)\.parquet")
_PARQUET_TMP = re.compile(r"\.events-\d{8}T\d{6}-(\d+)-(\d+)\.parquet\.[0-9a-f]+\.tmp")  # trec.io.atomic_path's
_STALE_EMPTY_S = 60.0  # a writer creates its WAL, locks it and writes to it within microseconds
_OPTIONAL = (str, type(None))
_TYPES = {"user_id": str, "item_id": str, "event": str, "experiment": _OPTIONAL, "arm": _OPTIONAL, "context": dict}


def parse_event_labels(text: str) -> dict[str, float]:
    """``purchase=1,like=0.9,click=0.5`` → {event: label}; labels finite in [0, 1]."""
    labels: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not EVENT_NAME.fullmatch(name):
            raise TrecError(f"event labels: bad entry {quote(entry)} (expected NAME=LABEL with NAME matching "
                            f"{EVENT_NAME.pattern}, like purchase=1,click=0.5)")
        try:
            label = float(value)
        except ValueError:
            label = math.nan
        if not 0.0 <= label <= 1.0 or name in labels:  # NaN fails too
            raise TrecError(f"event labels: entry {quote(entry)}: " + (f"event {quote(name)} is given twice"
                            if name in labels else "label must be a number in [0, 1]"))
        labels[name] = label
    return labels


@dataclass(frozen=True)
class FeedbackEvent:
    """One feedback event: ``user_id`` did ``event`` (worth ``label``) on ``item_id`` at ``timestamp``."""

    user_id: str
    item_id: str
    event: str
    label: float
    timestamp: int
    """Unix seconds."""
    context: dict[str, str] = field(default_factory=dict)
    experiment: str | None = None
    arm: str | None = None


class EventLog:
    """A thread-safe appender of feedback events to ``directory`` (see the module docstring); buffered rows
    go to one Parquet file when there are ``max_rows`` of them or the oldest is ``max_age_s`` old."""

    def __init__(self, directory: Path, context_names: Sequence[str] = (), max_rows: int = 100_000,
                 max_age_s: float = 60.0, fsync: bool = True):
        self.directory = Path(directory)
        self.context_names = tuple(context_names)
        for position, name in enumerate(self.context_names):
            if not EVENT_NAME.fullmatch(name) or name in (*FIXED_COLUMNS, *self.context_names[:position]):
                raise TrecError(f"event log: bad context name {quote(name)} (must match {EVENT_NAME.pattern}, "
                                f"be unique and not be one of {', '.join(FIXED_COLUMNS)})")
        if max_rows < 1 or not max_age_s > 0:
            raise TrecError(f"event log: max_rows must be >= 1 and max_age_s > 0, got {max_rows}, {max_age_s}")
        self.max_rows, self.max_age_s, self.fsync = max_rows, max_age_s, fsync
        numeric = {"label": pa.float32(), "timestamp": pa.int64()}  # the rest: nullable strings
        self.schema = pa.schema([(name, numeric.get(name, pa.string())) for name in (*FIXED_COLUMNS, *context_names)])
        self._lock = threading.Lock()
        self._rows, self._oldest = [], 0.0  # the buffer, time.monotonic() of its first row
        self._wal, self._wal_path, self._closed = None, None, False  # the fd of our WAL, flock-ed while open
        self._appended = self._files = self._recovered = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq = self._first_free_seq()
        self._recover()

    def append(self, events: list[FeedbackEvent]) -> None:
        """Write ``events`` to the WAL (durable when this returns, with ``fsync``) and buffer them. ValueError
        (nothing written) for a context key not in ``context_names``, a label outside [0, 1], a negative or
        non-integer timestamp, a non-string ID: ``trec data prepare`` would refuse the whole file."""
        if not (rows := [self._row(event) for event in events]):
            return
        data = "".join(json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n" for row in rows).encode()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"event log {self.directory} is closed")
            if self._wal is None:
                self._open_wal()
            self._write_wal(data)
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.extend(rows)
            self._appended += len(rows)
            try:  # the rows are durable in the WAL: a failed rotation is retried later, not the caller's error
                self._rotate_if_due()
            except OSError:
                log.exception("event log %s: rotation failed (rows stay in the WAL; retried later)", self.directory)

    def maybe_rotate(self) -> None:
        """Rotate if the buffer is full or its oldest row is ``max_age_s`` old (call it from a timer)."""
        with self._lock:
            if not self._closed:
                self._rotate_if_due()

    def close(self) -> None:
        """Rotate what is buffered and release the WAL; later calls do nothing."""
        with self._lock:
            if not self._closed:
                self._rotate()
                self._closed = True

    @property
    def stats(self) -> dict[str, int]:
        """rows_appended, files_written (rotations and recoveries), rows_buffered, rows_recovered."""
        with self._lock:
            return {"rows_appended": self._appended, "files_written": self._files,
                    "rows_buffered": len(self._rows), "rows_recovered": self._recovered}

    def _row(self, event: FeedbackEvent) -> dict:
        if unknown := sorted(set(event.context) - set(self.context_names)):
            raise ValueError(f"unknown context key {quote(unknown[0])} (expected one of {list(self.context_names)})")
        row = dataclasses.asdict(event)
        if problem := _problem(row):
            raise ValueError(f"feedback event {quote(row)}: {problem}")
        row["label"] = float(row["label"])
        return row

    def _write_wal(self, data: bytes) -> None:
        """One write (O_APPEND): a crash tears only the last line; a failed write is cut back off (no half line)."""
        start = os.lseek(self._wal, 0, os.SEEK_END)
        try:
            if os.write(self._wal, data) != len(data):
                raise OSError(f"event log {self._wal_path}: short write (disk full?)")
            if self.fsync:
                os.fsync(self._wal)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._wal, start)
            raise

    def _rotate_if_due(self) -> None:
        if len(self._rows) >= self.max_rows or (self._rows and time.monotonic() - self._oldest >= self.max_age_s):
            self._rotate()

    def _rotate(self) -> None:
        """Buffered rows → one Parquet file; then the WAL (which holds the same rows) goes."""
        if self._rows:
            self._write_parquet(self._rows, os.getpid(), self._seq)
            self._rows = []  # published: a failed unlink below must not publish them twice
        if self._wal is not None:
            fd, path, self._wal, self._wal_path, self._seq = self._wal, self._wal_path, None, None, self._seq + 1
            try:  # a WAL left behind is published (a Parquet file has its PID-SEQ): recovery deletes it
                os.unlink(path)
            finally:
                os.close(fd)  # releases the flock only after the WAL is gone

    def _open_wal(self) -> None:
        """Create and lock a new WAL (recovery leaves young empty WALs alone: between create and flock)."""
        while (path := self.directory / f".wal-{os.getpid()}-{self._seq}.jsonl").exists():
            self._seq += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._wal, self._wal_path = fd, path

    def _write_parquet(self, rows: list[dict], pid: int, seq: int) -> None:
        columns = {name: [row[name] for row in rows] for name in FIXED_COLUMNS}
        columns.update({name: [row["context"].get(name) for row in rows] for name in self.context_names})
        table = pa.table(columns, schema=self.schema)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        with atomic_path(self.directory / f"events-{stamp}-{pid}-{seq}.parquet") as tmp, open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        if self.fsync:  # the rename itself
            dir_fd = os.open(self.directory, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
        self._files += 1

    def _first_free_seq(self) -> int:
        """A SEQ above every WAL or Parquet name of this PID (a dead process may have had the same PID)."""
        keys = [_key(_WAL, path) or _key(_PARQUET, path) for path in self.directory.iterdir()]
        return 1 + max([int(key[1]) for key in keys if key and int(key[0]) == os.getpid()], default=-1)

    def _recover(self) -> None:
        """Convert the WALs of dead writers (those this process can lock) to Parquet and remove them."""
        for path in sorted(self.directory.glob(".wal-*.jsonl")):
            fd = _lock_if_dead(path) if _key(_WAL, path) else None
            if fd is None:
                continue
            try:
                info, key = os.fstat(fd), _key(_WAL, path)
                if not info.st_size and time.time() - info.st_mtime < _STALE_EMPTY_S:
                    continue  # a writer between creating its WAL and locking it
                # Already published when the writer died after its rename, before deleting the WAL.
                if not any(_key(_PARQUET, done) == key for done in self.directory.glob("events-*.parquet")):
                    with os.fdopen(os.dup(fd), "rb") as handle:
                        rows = self._wal_rows(path, handle.read().split(b"\n"))
                    if rows:
                        self._write_parquet(rows, int(key[0]), int(key[1]))
                        self._recovered += len(rows)
                        log.warning("event log: recovered %d events of a dead writer from %s", len(rows), path)
                for stale in self.directory.glob(".events-*.tmp"):  # its cut-short rotation
                    if _key(_PARQUET_TMP, stale) == key:
                        stale.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def _wal_rows(self, path: Path, lines: list[bytes]) -> list[dict]:
        """A WAL's rows: bad lines are skipped with a warning, context keys not in this log's are dropped."""
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:
                row = None
            if row != {} and (problem := _problem(row)):
                torn = number == len(lines)  # a crash mid-write tears only the last line (no newline yet)
                log.warning("event log: %s line %d: skipped %s", path, number,
                            "a torn last line (a crash mid-write)" if torn else f"a bad line ({problem})")
            elif row:
                row["context"] = {k: v for k, v in row["context"].items() if k in self.context_names}
                rows.append(row)
        return rows


def _problem(row: object) -> str | None:
    """What makes ``row`` (an event or a WAL line) unfit for the Parquet schema, or None."""
    if not isinstance(row, dict) or set(row) != {*FIXED_COLUMNS, "context"}:
        return f"not an object of the fields {', '.join(FIXED_COLUMNS)}, context"
    wrong = [name for name, kind in _TYPES.items() if not isinstance(row[name], kind)]
    if wrong or not all(isinstance(value, str) for value in row["context"].values()):
        return f"{(wrong or ['context'])[0]} is not a string (context: an object of strings)"
    label, stamp = row["label"], row["timestamp"]
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
        return "label is not a number in [0, 1]"
    if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 2**63:
        return "timestamp is not integer unix seconds >= 0"
    return None


def _key(pattern: re.Pattern, path: Path) -> tuple[str, str] | None:
    """The (PID, SEQ) of a log file name."""
    return match.groups() if (match := pattern.fullmatch(path.name)) else None


def _lock_if_dead(path: Path) -> int | None:
    """An fd of ``path`` holding its exclusive flock, or None if a live process holds it, it is gone, or
    the name now points at another file (another process recovered it meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None
