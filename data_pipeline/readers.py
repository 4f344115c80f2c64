"""Streaming readers of raw files: record batches of a text or Parquet file, each with its Location.

Text files are read by pyarrow's CSV reader with every column as a string (types are decided
by :mod:`data_pipeline.validate`, which knows the column's meaning and reports bad values by
line). Empty lines are read as rows of empty strings and skipped here (each run of non-empty
lines becomes its own batch), so line numbers stay exact; a row with the wrong number of
fields stops with its line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import io
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.validate import Location
from trec.errors import TrecError
from trec.io import quote

_TEXT_BLOCK_BYTES = 8 << 20
_DELIMITER_NAMES = {"\t": "tab", ",": "comma", "|": "'|'", ";": "';'"}


@dataclass(frozen=True)
class TextFormat:
    """How a delimited text file is laid out."""

    delimiter: str
    """Field separator as written in the file (may be several characters, e.g. '::')."""
    names: tuple[str, ...] = ()
    """Column names of a file without a header; empty when the first line is a header."""
    encoding: str = "utf-8"
    quoting: bool = False
    """Whether fields may be "quoted" (CSV); GroupLens' '|' and '::' files are not quoted."""

    @property
    def delimiter_name(self) -> str:
        return _DELIMITER_NAMES.get(self.delimiter, f"'{self.delimiter}'")


def display_names(paths: Sequence[Path], root: Path | None) -> list[str]:
    """Names for error messages: paths relative to ``root`` (the source directory) where possible."""
    names = []
    for path in paths:
        try:
            names.append(str(path.relative_to(root)) if root else path.name)
        except ValueError:
            names.append(path.name)
    return names


def resolve_files(source: str, suffixes: Sequence[str], what: str) -> tuple[list[Path], Path | None]:
    """A file, a directory (its files ending in one of ``suffixes``, sorted) or a glob → (files, root)."""
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        root = None
    else:
        path = Path(source)
        if path.is_file():
            return [path], path.parent
        if not path.is_dir():
            raise TrecError(f"{source}: no such file or directory")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
        root = path
    if not files:
        raise TrecError(f"{source}: no {what} files found (expected names ending in {', '.join(suffixes)})")
    return files, root


def _check_not_empty(path: Path, display: str) -> None:
    if path.stat().st_size == 0:
        raise TrecError(f"{display}: empty file (no rows)")


def text_header(path: Path, display: str, fmt: TextFormat) -> list[str]:
    """The column names on the first line of a text file with a header."""
    _check_not_empty(path, display)
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
    encoding = "utf-8-sig" if codecs.lookup(fmt.encoding).name == "utf-8" else fmt.encoding
    try:
        with open(path, encoding=encoding, newline="") as handle:
            first = handle.readline().rstrip("\r\n")
    except UnicodeDecodeError:
        raise TrecError(encoding_error(path, display, fmt.encoding)) from None
    try:
        names = next(csv.reader([first], delimiter=fmt.delimiter)) if fmt.quoting else first.split(fmt.delimiter)
    except csv.Error as error:  # e.g. a header field over the csv module's field size limit
        raise TrecError(f"{display} line 1: cannot parse the header: {str(error)[:200]}") from None
    check_unique_columns(display, names)
    return names


def check_unique_columns(display: str, names: Sequence[str]) -> None:
    """A column named twice is ambiguous: which one holds the user IDs?"""
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise TrecError(f"{display}: duplicate column name {quote(repeated[0])} (each column must be named once)")


def encoding_error(path: Path, display: str, encoding: str) -> str:
    """The message for a file that is not valid ``encoding`` text, naming the first bad line."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line, offset = 1, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk[: error.start].count(b"\n")
                offset += error.start
                return (f"{display} line {line}: not valid {_encoding_name(encoding)} text (byte {offset}); "
                        f"convert the file to {_encoding_name(encoding)}")
            line += chunk.count(b"\n")
            offset += len(chunk)
    return f"{display}: not valid {_encoding_name(encoding)} text; convert the file to {_encoding_name(encoding)}"


def _encoding_name(encoding: str) -> str:
    return "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding


def _open_text(path: Path, fmt: TextFormat) -> io.IOBase | str:
    if len(fmt.delimiter) == 1:
        return str(path)
    # pyarrow's CSV parser takes one-character delimiters: rewrite e.g. '::' (ML-1M) as a tab.
    # Only GroupLens' small '::' files take this path, so holding one in memory is fine.
    return io.BytesIO(path.read_bytes().replace(fmt.delimiter.encode(fmt.encoding), b"\t"))


@contextlib.contextmanager
def _undecodable_rows(found: list[UnicodeDecodeError]) -> Iterator[None]:
    """Record, instead of printing, pyarrow's failure to decode an invalid row for ``invalid_row_handler``.

    pyarrow decodes a malformed row's bytes as UTF-8 before calling the handler; bytes that are
    not UTF-8 fail inside Cython, which prints "Exception ignored ..." and a traceback to stderr
    (sys.unraisablehook). Such a row means the file is not valid text: the caller says so.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError):
            found.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def read_text(path: Path, display: str, fmt: TextFormat) -> Iterator[tuple[pa.RecordBatch, Location]]:
    """Record batches of string columns, each with the Location of its first row (line numbers)."""
    _check_not_empty(path, display)
    names = list(fmt.names) or text_header(path, display, fmt)
    header_lines = 0 if fmt.names else 1
    invalid: list = []

    def on_invalid(row) -> str:
        invalid.append(row)
        return "error"

    delimiter = fmt.delimiter if len(fmt.delimiter) == 1 else "\t"
    reader_options = pacsv.ReadOptions(
        use_threads=False,  # row numbers of invalid rows are only known when reading in order
        block_size=_TEXT_BLOCK_BYTES,
        encoding=fmt.encoding,
        column_names=names,
        skip_rows=header_lines,
    )
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if fmt.quoting else False,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
    )
    convert_options = pacsv.ConvertOptions(column_types={name: pa.string() for name in names})
    line = header_lines + 1
    rows = 0
    reader = None
    undecodable: list[UnicodeDecodeError] = []
    try:
        with _undecodable_rows(undecodable):
            reader = pacsv.open_csv(_open_text(path, fmt), reader_options, parse_options, convert_options)
            for batch in reader:
                for start, stop in _runs(~_blank_rows(batch)):
                    rows += stop - start
                    yield batch.slice(start, stop - start), Location(display, "line", line + start)
                line += batch.num_rows
    except pa.ArrowInvalid as error:
        if "invalid UTF8" in str(error) or undecodable:
            raise TrecError(encoding_error(path, display, fmt.encoding)) from None
        if invalid:
            row = invalid[0]
            raise TrecError(
                f"{display} line {row.number}: expected {row.expected_columns} {fmt.delimiter_name}-separated "
                f"fields ({', '.join(names)}), got {row.actual_columns}"
            ) from None
        raise TrecError(f"{display}: cannot parse as {fmt.delimiter_name}-separated text: {_first_line(error)}") from None
    finally:
        # Stop the reader's read-ahead (an Arrow thread that calls back into on_invalid) now, on an
        # error too: left to interpreter shutdown, it can outlive Python and abort the process.
        if reader is not None:
            reader.close()
    if rows == 0:
        raise TrecError(f"{display}: empty file (no rows)")


def _blank_rows(batch: pa.RecordBatch) -> np.ndarray:
    blank = np.ones(batch.num_rows, dtype=bool)
    for column in batch.columns:
        blank &= pc.equal(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
    return blank


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive True values (the non-blank lines of a batch)."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _first_line(error: Exception, limit: int = 200) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def open_parquet(path: Path, display: str) -> pq.ParquetFile:
    """Open a Parquet file, turning a truncated or corrupt one into a one-line error."""
    _check_not_empty(path, display)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        raise TrecError(f"{display}: truncated or corrupt Parquet file (cannot read its footer)") from None


def check_columns(display: str, available: Sequence[str], required: Sequence[str]) -> None:
    for name in required:
        if name and name not in available:
            listing = ", ".join(available)
            if len(listing) > 200:  # a header can be one enormous line: quote its start only
                listing = f"{listing[:200]}... ({len(available)} columns)"
            raise TrecError(f"{display}: missing column {quote(name)} (columns: {listing})")


def read_parquet(path: Path, display: str, columns: Sequence[str]) -> Iterator[tuple[pa.RecordBatch, Location]]:
    """Record batches of ``columns``, one per row group, each with the Location of its first row."""
    parquet = open_parquet(path, display)
    check_unique_columns(display, parquet.schema_arrow.names)
    check_columns(display, parquet.schema_arrow.names, columns)
    if parquet.metadata.num_rows == 0:
        raise TrecError(f"{display}: empty file (no rows)")
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=list(columns))
        except (pa.ArrowException, OSError):
            raise TrecError(f"{display} row group {group}: truncated or corrupt Parquet data") from None
        for batch in table.combine_chunks().to_batches():
            yield batch, Location(display, "row", row)
            row += batch.num_rows
