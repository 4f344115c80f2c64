"""Parquet writers of a prepared dataset: split shards and whole tables, with their checksums."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.layout import INTERACTION_ROW_GROUP, shard_name
from trec.io import sha256_file


class ShardWriter:
    """A split as ``part-00000.parquet``, ``part-00001.parquet``, ... of at most ``rows_per_shard``
    rows each, written as they come (one open file at a time), row groups of the reader's block size."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int) -> None:
        self.directory = Path(directory)
        self.schema = schema
        self.rows_per_shard = max(int(rows_per_shard), 1)
        self.files: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / shard_name(len(self.files))
        self._writer = pq.ParquetWriter(path, self.schema)
        self.files.append(path)
        self._in_shard = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._in_shard >= self.rows_per_shard:
                self._close_current()
                self._open()
            take = min(self.rows_per_shard - self._in_shard, table.num_rows - start)
            self._writer.write_table(table.slice(start, take), row_group_size=INTERACTION_ROW_GROUP)
            self._in_shard += take
            self.rows += take
            start += take

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[Path]:
        """Finish the last shard; an empty split still gets one (empty) shard carrying the schema."""
        if not self.files:
            self._open()
        self._close_current()
        return self.files


def write_table(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=INTERACTION_ROW_GROUP)
    return path


def file_entries(root: Path, paths: list[Path]) -> dict:
    """``{relative path: {sha256, rows, bytes}}`` for the manifest."""
    entries = {}
    for path in sorted(paths):
        entries[path.relative_to(root).as_posix()] = {
            "sha256": sha256_file(path),
            "rows": pq.ParquetFile(path).metadata.num_rows,
            "bytes": path.stat().st_size,
        }
    return entries
