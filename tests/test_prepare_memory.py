"""`trec data prepare`'s scratch passes hold one batch of a scratch file at a time, not the file.

Arrow's default read-ahead (``pre_buffer``) made ``ParquetFile.iter_batches`` keep every row
group's compressed bytes until the file was closed, so the map, observe and write passes grew by
about 10 bytes per interaction (1.34 GiB in the map pass at 100M). Arrow's own allocation counter
is exact, so this checks the bound without timing or RSS.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import prepare

ROWS_PER_GROUP = 1 << 16
GROUPS = 32


@pytest.fixture
def scratch_file(tmp_path, monkeypatch):
    """32 row groups of two columns of random int64s (incompressible: 1 MiB each, 32 MiB in all),
    read back in batches of one row group."""
    monkeypatch.setattr(prepare, "PASS_BATCH_ROWS", ROWS_PER_GROUP)
    path = tmp_path / "mapped.parquet"
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, pa.schema([("user_id", pa.int64()), ("timestamp", pa.int64())]),
                          compression="lz4") as writer:
        for _ in range(GROUPS):
            writer.write_table(pa.table({"user_id": rng.integers(0, 1 << 62, ROWS_PER_GROUP),
                                         "timestamp": rng.integers(0, 1 << 62, ROWS_PER_GROUP)}))
    return path


@pytest.mark.parametrize("columns", [None, ["user_id"]])
def test_a_pass_over_a_scratch_file_holds_one_batch_not_the_file(scratch_file, columns):
    baseline = pa.total_allocated_bytes()
    held, starts = [], []
    for table, start in prepare._batches(scratch_file, columns):
        held.append(pa.total_allocated_bytes() - baseline)
        starts.append(start)
        del table
    assert starts == [i * ROWS_PER_GROUP for i in range(GROUPS)]
    file_bytes = scratch_file.stat().st_size
    # A batch and the reader's buffers (under 5 MiB here); the old read-ahead held 22 MiB of one column
    # by the end, and 37 MiB of both columns from the first batch on.
    assert max(held) < file_bytes // 4, f"arrow bytes held at each batch: {held}"
    assert held[-1] <= held[GROUPS // 4], f"grows with the rows read: {held}"
