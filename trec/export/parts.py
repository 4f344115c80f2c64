"""Embedding parts: ``embeddings/{items,users}-part-R.parquet``, one file per exporting rank.

Columns of every part:

- ``raw_id``: the ID as the raw data spells it (string, or int64 where the dataset's ID
  mapping keeps integers); every part of one kind uses the same type;
- ``index``: int64, the row of the item (user) in the dataset's vocabulary; for items this is
  also the FAISS vector id in every index shard;
- ``vector``: ``fixed_size_list<float32>[D]``.

Writing streams batches into one part (:class:`EmbeddingPartWriter`), so a rank never holds
more than a batch; reading streams record batches across parts in part order
(:func:`iter_embedding_batches`). A part is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trec.errors import TrecError
from trec.io import streaming_parquet

KINDS = ("items", "users")
_PART_RE = re.compile(r"^(items|users)-part-(\d+)\.parquet$")
_COLUMNS = ("raw_id", "index", "vector")


class EmbeddingBatch(NamedTuple):
    """Rows of one or more parts: ``raw_ids`` (N,), ``indices`` (N,) int64, ``vectors`` N X D float32."""

    raw_ids: np.ndarray | None
    indices: np.ndarray
    vectors: np.ndarray | None


def part_name(kind: str, rank: int) -> str:
    _check_kind(kind)
    return f"{kind}-part-{rank}.parquet"


def part_path(directory: str | os.PathLike, kind: str, rank: int) -> Path:
    """``DIR/{kind}-part-{rank}.parquet``: where rank ``rank`` writes its slice."""
    return Path(directory) / part_name(kind, rank)


def part_paths(directory: str | os.PathLike, kind: str = "items") -> list[Path]:
    """Every ``{kind}-part-R.parquet`` in ``directory``, ordered by R (numerically)."""
    _check_kind(kind)
    directory = Path(directory)
    found = []
    for path in directory.glob(f"{kind}-part-*.parquet"):
        match = _PART_RE.match(path.name)
        if match:
            found.append((int(match.group(2)), path))
    if not found:
        raise TrecError(f"{directory}: no {kind}-part-*.parquet embedding parts found")
    return [path for _, path in sorted(found)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise TrecError(f"embedding kind: expected one of {', '.join(KINDS)}, got '{kind}'")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _raw_id_type(raw_ids: np.ndarray) -> pa.DataType:
    """int64 for integer IDs, string for everything else (the mapping's own spelling)."""
    return pa.int64() if np.issubdtype(raw_ids.dtype, np.integer) else pa.string()


def _schema(dimension: int, raw_id_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field("raw_id", raw_id_type, nullable=False),
            pa.field("index", pa.int64(), nullable=False),
            pa.field("vector", pa.list_(pa.field("item", pa.float32(), nullable=False), dimension), nullable=False),
        ]
    )


class EmbeddingPartWriter:
    """Stream ``(raw_ids, indices, vectors)`` batches into one part file.

    The file appears under its final name only when the writer is closed without error::

        with EmbeddingPartWriter(part_path(tmp / "embeddings", "items", rank), dimension=64) as part:
            for raw_ids, indices, vectors in batches:     # (B,), (B,) int64, B X 64 float32
                part.write(raw_ids, indices, vectors)
    """

    def __init__(self, path: str | os.PathLike, dimension: int, row_group_rows: int = 65_536):
        self.path = Path(path)
        self.dimension = int(dimension)
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._writer: pq.ParquetWriter | None = None
        self._raw_id_type: pa.DataType | None = None

    def write(self, raw_ids: Sequence | np.ndarray, indices: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Append B rows: ``raw_ids`` (B,), ``indices`` (B,) int64, ``vectors`` B X D float32."""
        raw_ids = np.asarray(raw_ids)
        indices = np.asarray(indices, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise TrecError(f"{self.path}: vectors must be B X {self.dimension}, got shape {tuple(vectors.shape)}")
        if not (len(raw_ids) == len(indices) == len(vectors)):
            raise TrecError(
                f"{self.path}: raw_ids, indices and vectors differ in length "
                f"({len(raw_ids)}, {len(indices)}, {len(vectors)})"
            )
        if self._writer is None:
            self._raw_id_type = _raw_id_type(raw_ids)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, _schema(self.dimension, self._raw_id_type))
        ids = raw_ids.astype(np.int64) if pa.types.is_integer(self._raw_id_type) else raw_ids.astype(str)
        table = pa.table(
            {
                "raw_id": pa.array(ids, type=self._raw_id_type),
                "index": pa.array(indices, type=pa.int64()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), self.dimension),
            },
            schema=self._writer.schema,
        )
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += len(indices)

    def close(self) -> Path:
        if self._writer is None:  # no rows: still an (empty) part, so every rank leaves its file
            self._writer = pq.ParquetWriter(self._tmp, _schema(self.dimension, pa.string()))
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddingPartWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_embedding_part(
    path: str | os.PathLike, raw_ids: Sequence | np.ndarray, indices: Sequence[int] | np.ndarray, vectors: np.ndarray
) -> Path:
    """Write one whole part: ``raw_ids`` (N,), ``indices`` (N,) int64, ``vectors`` N X D float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise TrecError(f"{path}: vectors must be N X D, got shape {tuple(vectors.shape)}")
    with EmbeddingPartWriter(path, vectors.shape[1]) as writer:
        writer.write(raw_ids, indices, vectors)
    return Path(path)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def part_dimension(path: Path) -> int:
    """D of a part, from its schema (no data read); refuses a part that is not trec's layout."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise TrecError(f"{path}: not a readable Parquet file ({error})") from None
    missing = [name for name in _COLUMNS if name not in schema.names]
    if missing:
        raise TrecError(f"{path}: missing column(s) {', '.join(missing)}; expected raw_id, index, vector")
    vector = schema.field("vector").type
    if not (pa.types.is_fixed_size_list(vector) and pa.types.is_float32(vector.value_type)):
        raise TrecError(f"{path}: column 'vector' must be fixed_size_list<float32>[D], found {vector}")
    return vector.list_size


def part_rows(path: Path) -> int:
    """Rows of a part, from the Parquet footer."""
    return pq.ParquetFile(path).metadata.num_rows


def _vectors(column: pa.Array, dimension: int, path: Path) -> np.ndarray:
    if column.null_count:
        raise TrecError(f"{path}: column 'vector' has null rows")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dimension).astype(np.float32, copy=False)


def _raw_ids(column: pa.Array) -> np.ndarray:
    if pa.types.is_integer(column.type):
        return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return column.to_numpy(zero_copy_only=False).astype(object, copy=False)


def iter_embedding_batches(
    paths: Iterable[Path],
    columns: Sequence[str] = _COLUMNS,
    batch_rows: int = 65_536,
) -> Iterator[EmbeddingBatch]:
    """Stream the rows of ``paths`` in order as :class:`EmbeddingBatch` (absent columns are None).

    Every part must share one dimension D; reading ``index`` alone touches 8 bytes per row.
    """
    dimension = None
    for path in paths:
        part_dim = part_dimension(path)
        if dimension is not None and part_dim != dimension:
            raise TrecError(f"{path}: vectors have dimension {part_dim}, earlier parts have {dimension}")
        dimension = part_dim
        wanted = [name for name in _COLUMNS if name in columns or name == "index"]
        for batch in streaming_parquet(path).iter_batches(batch_size=batch_rows, columns=wanted):
            yield EmbeddingBatch(
                raw_ids=_raw_ids(batch.column("raw_id")) if "raw_id" in wanted else None,
                indices=batch.column("index").to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
                vectors=_vectors(batch.column("vector"), part_dim, path) if "vector" in wanted else None,
            )


def read_embedding_parts(
    directory: str | os.PathLike, kind: str = "items"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows of ``DIR/{kind}-part-*.parquet``: ``(raw_ids (N,), indices (N,) int64, vectors N X D float32)``.

    Rows come in part order (part 0's rows first), as written.
    """
    paths = part_paths(directory, kind)
    dimension = part_dimension(paths[0])
    raw_ids, indices, vectors = [], [], []
    for batch in iter_embedding_batches(paths):
        raw_ids.append(batch.raw_ids)
        indices.append(batch.indices)
        vectors.append(batch.vectors)
    keep = [i for i, batch_indices in enumerate(indices) if len(batch_indices)]
    if not keep:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64), np.empty((0, dimension), np.float32)
    if len({raw_ids[i].dtype.kind for i in keep}) > 1:
        raise TrecError(f"{directory}: {kind} parts mix integer and string raw_id columns")
    return tuple(np.concatenate([column[i] for i in keep]) for column in (raw_ids, indices, vectors))
