"""Validation of a prepared dataset's files: manifest fields, index and number columns, checksums,
and unreadable Parquet, each refused with one TrecError line naming the file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import layout as L
from trec.data.batch import FeatureSpec
from trec.errors import TrecError
from trec.io import JsonField, check_json_fields, path_inside, quote, read_json_object, sha256_file

# The JSON type of every manifest field trec reads (README "Data"); a new field is one more line.
_MANIFEST_FIELDS = {
    "format_version": JsonField(int),
    "num_users": JsonField(int, minimum=1),
    "num_items": JsonField(int, minimum=1),
    "counts": JsonField(dict),
    "features": JsonField(list, items=JsonField(dict)),
    "files": JsonField(dict),
    "split": JsonField(dict),
    "id_mapping": JsonField(dict),
    "num_interactions": JsonField(int, minimum=0, required=False),
    "has_rating": JsonField(bool, required=False),
    "has_label": JsonField(bool, required=False),
    "history_max_len": JsonField(int, minimum=0, required=False),
    "source": JsonField(dict, required=False),
    "serving": JsonField(bool, required=False),  # request-time tables (trec.data.tables): no split files
    "positive_threshold": JsonField(float, required=False),  # theirs: what popularity.parquet counted
}
_FILE_FIELDS = {"bytes": JsonField(int, minimum=0), "sha256": JsonField(str),
                "rows": JsonField(int, minimum=0, required=False)}
_ROW_COUNT = JsonField(int, minimum=0)

def check_indices(column: pa.Array | pa.ChunkedArray, low: int, high: int, path: Path, name: str) -> None:
    """Refuse (TrecError naming file and column) a column that is not integers in ``[low, high)`` without nulls."""
    if not pa.types.is_integer(column.type) or column.null_count:
        raise TrecError(f"{path}: column '{name}' must hold integer indices without nulls "
                        f"(found {column.type}, {column.null_count} nulls)")
    if len(column) == 0:
        return
    bounds = pc.min_max(column)
    smallest, largest = bounds["min"].as_py(), bounds["max"].as_py()
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise TrecError(f"{path}: column '{name}' holds index {bad}, outside {low}..{high - 1} "
                        f"(the file does not match {L.MANIFEST})")


def check_finite(column: pa.Array | pa.ChunkedArray, path: Path, name: str) -> None:
    """Refuse (TrecError naming file and column) a column that is not numbers, all finite, without nulls."""
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)) or column.null_count:
        raise TrecError(f"{path}: column '{name}' must hold numbers without nulls "
                        f"(found {column.type}, {column.null_count} nulls)")
    if pa.types.is_floating(column.type) and len(column):
        values = column.to_numpy() if isinstance(column, pa.Array) else column.combine_chunks().to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            raise TrecError(f"{path}: column '{name}' holds {values[bad][0]} at row {int(np.argmax(bad))} "
                            f"(labels and ratings must be finite; the file does not match {L.MANIFEST})")


@contextlib.contextmanager
def parquet_errors(path: Path) -> Iterator[None]:
    """Turn pyarrow's failure to read ``path`` (truncated, garbage, a column missing) into one TrecError line.

    A damaged shard of a prepared dataset or an export would otherwise end in a pyarrow traceback
    (or a multi-line message): the line names the file and quotes the first line of the cause.
    """
    try:
        yield
    except (pa.ArrowException, OSError, KeyError) as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrecError(f"{path}: truncated, corrupt or not the expected Parquet file ({quote(cause)}); "
                        "restore it or prepare/export again") from None


def parquet_metadata(path: Path) -> pq.FileMetaData:
    with parquet_errors(path):
        return pq.ParquetFile(path).metadata


def check_id_table(spec: FeatureSpec, rows: int, where: Path) -> None:
    """user_id / item_id index the user / item tables: their embedding tables must have a row for each."""
    if spec.kind != "categorical" or spec.multi_hot or spec.cardinality < rows:
        raise TrecError(f"{where}: feature '{spec.name}' must be single-valued categorical with cardinality >= "
                        f"{rows} (one row per {spec.entity}), got {spec.kind} with cardinality {spec.cardinality}")


def check_manifest_fields(manifest: dict, root: Path, where: str) -> None:
    """Type-check the manifest (TrecError naming the field); every listed file must stay inside ``root``."""
    check_json_fields(manifest, _MANIFEST_FIELDS, where)
    for split, rows in manifest["counts"].items():
        if not _ROW_COUNT.accepts(rows):
            raise TrecError(f"{where}: field 'counts.{split}' must be {_ROW_COUNT.describe()}, got {quote(rows)}")
    for relative, entry in manifest["files"].items():
        path_inside(root, relative, where)
        if not isinstance(entry, dict):
            raise TrecError(f"{where}: field 'files.{relative}' must be an object, got {quote(entry)}")
        check_json_fields(entry, _FILE_FIELDS, f"{where}: files.{relative}")
    for entry in manifest["features"]:
        if isinstance(entry, dict) and entry.get("mapping_file") is not None:
            path_inside(root, entry["mapping_file"], f"{where}: feature {quote(entry.get('name'))}")


def _standardise(column: pa.ChunkedArray, spec: FeatureSpec) -> np.ndarray:
    """(x - mean) / std as float32; missing values (NaN) are filled with the mean, i.e. 0."""
    values = column.to_numpy().astype(np.float32)
    std = spec.std if spec.std else 1.0
    values = (values - np.float32(spec.mean or 0.0)) / np.float32(std)
    return np.nan_to_num(values, nan=0.0).astype(np.float32)

def read_manifest(path: Path, verify: bool = False) -> dict:
    """``path``'s manifest, validated (version, field types, listed files present); ``verify`` also
    checks every listed file's size and sha256."""
    manifest_path = path / L.MANIFEST
    if not manifest_path.is_file():
        raise TrecError(f"{path}: not a prepared dataset (no {L.MANIFEST}; create one with `trec data prepare`)")
    manifest = read_json_object(manifest_path)
    version = manifest.get("format_version")
    if version != L.FORMAT_VERSION:
        raise TrecError(f"{manifest_path}: format_version {version} is not supported (this trec reads "
                        f"{L.FORMAT_VERSION}); prepare the dataset again with this version")
    check_manifest_fields(manifest, path, str(manifest_path))
    for relative in manifest["files"]:
        if not (path / relative).is_file():
            raise TrecError(f"{path / relative}: missing (listed in {L.MANIFEST})")
    if verify:
        verify_files(path, manifest["files"])
    return manifest


def verify_files(root: Path, files: dict) -> None:
    """Check every listed file's size and sha256 against the manifest."""
    for relative, entry in sorted(files.items()):
        path = root / relative
        if not path.is_file():
            raise TrecError(f"{path}: missing (listed in {L.MANIFEST})")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise TrecError(f"{path}: checksum mismatch (the file changed after `trec data prepare`)")

