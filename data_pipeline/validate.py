"""Typed conversion of raw columns, with errors that name file, line (or row) and column.

Every source reads its files as record batches and hands each batch here together with a
:class:`Location`: the file's display name and the line (text) or row (Parquet) of the batch's
first row. A bad value stops preparation with one :class:`TrecError` line such as::

    u.data line 17: column item_id: 'abc' is not an integer
    ratings.parquet row 3: column rating: -1 is negative

Lines count from 1 as in an editor (a header is line 1); Parquet rows count from 0, as in
``table.slice(row)``. The fast path is vectorised; only a failing batch is scanned in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trec.errors import TrecError
from trec.io import quote

INT_PATTERN = r"^\s*[+-]?[0-9]+\s*$"


@dataclass(frozen=True)
class Location:
    """Where a batch starts: ``file`` (display name), ``unit`` ('line' or 'row'), ``first`` number.

    ``lines`` (optional) gives the number of every row instead, for a whole small file whose
    rows are not consecutive lines (blank lines skipped).
    """

    file: str
    unit: str
    first: int
    lines: np.ndarray | None = field(default=None, compare=False)

    def at(self, offset: int) -> str:
        number = self.first + int(offset) if self.lines is None else int(self.lines[int(offset)])
        return f"{self.file} {self.unit} {number}"

    def fail(self, offset: int, column: str, message: str) -> NoReturn:
        raise TrecError(f"{self.at(offset)}: column {column}: {message}")


def format_number(value: float) -> str:
    """3.0 → '3', -1.5 → '-1.5', nan → 'NaN' (the way a user wrote it, not numpy's repr)."""
    if math.isnan(value):
        return "NaN"
    return f"{value:g}"


def _first_null(array: pa.Array) -> int | None:
    if array.null_count == 0:
        return None
    return int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])


def _first_false(mask: pa.Array | np.ndarray) -> int | None:
    values = mask.to_numpy(zero_copy_only=False) if isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    bad = np.flatnonzero(~values.astype(bool))
    return int(bad[0]) if len(bad) else None


def _check_present(array: pa.Array, loc: Location, column: str) -> None:
    missing = _first_null(array)
    if missing is None and pa.types.is_string(array.type):
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0)
        hit = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
        missing = int(hit[0]) if len(hit) else None
    if missing is not None:
        loc.fail(missing, column, "missing value")


def to_int64(array: pa.Array, loc: Location, column: str) -> pa.Array:
    """Integers (any int type, integral floats, or decimal strings) → int64; errors name the row."""
    _check_present(array, loc, column)
    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), array.type.value_type
    if pa.types.is_large_string(kind):
        array, kind = array.cast(pa.string()), pa.string()
    if pa.types.is_integer(kind):
        _check_int64_range(array, loc, column)
        return array.cast(pa.int64())
    if pa.types.is_floating(kind):
        values = array.to_numpy(zero_copy_only=False)
        bad = _first_false(np.isfinite(values) & (np.floor(values) == values))
        if bad is not None:
            loc.fail(bad, column, f"{format_number(values[bad])} is not an integer")
        return pa.array(values.astype(np.int64))
    if pa.types.is_string(kind):
        bad = _first_false(pc.match_substring_regex(array, INT_PATTERN))
        if bad is not None:
            loc.fail(bad, column, f"{quote(array[bad].as_py())} is not an integer")
        # Arrow's cast rejects a leading '+', which the pattern (and Python's int()) accept.
        stripped = pc.replace_substring_regex(pc.utf8_trim_whitespace(array), r"^\+", "")
        try:
            return stripped.cast(pa.int64())
        except (pa.ArrowInvalid, OverflowError):
            for offset, text in enumerate(stripped.to_pylist()):
                # Length first: int() refuses strings of more than 4300 digits (a ValueError, not a range).
                if len(text.lstrip("-").lstrip("0")) > 19 or not -(2**63) <= int(text) < 2**63:
                    loc.fail(offset, column, f"{quote(text)} is out of range for int64")
            raise
    raise TrecError(f"{loc.file}: column {column}: type {kind} is not an integer type")


def _check_int64_range(array: pa.Array, loc: Location, column: str) -> None:
    """uint64 values above 2^63 - 1 do not fit the int64 every ID and value is kept as."""
    if pa.types.is_uint64(array.type):
        # The bound as a uint64 scalar: compared with an int64 scalar, Arrow casts the array first and fails.
        fits = pc.fill_null(pc.less_equal(array, pa.scalar(np.iinfo(np.int64).max, pa.uint64())), True)
        too_big = _first_false(fits)
        if too_big is not None:
            loc.fail(too_big, column, f"{array[too_big].as_py()} is out of range for int64")


def to_float64(array: pa.Array, loc: Location, column: str, allow_missing: bool = False) -> np.ndarray:
    """Numbers (numeric types or decimal strings) → float64 numpy; missing → NaN if allowed."""
    if not allow_missing:
        _check_present(array, loc, column)
    kind = array.type
    if pa.types.is_large_string(kind):
        array, kind = array.cast(pa.string()), pa.string()
    if pa.types.is_string(kind):
        stripped = pc.utf8_trim_whitespace(array)
        if allow_missing:
            stripped = pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)
        try:
            array = stripped.cast(pa.float64())
        except pa.ArrowInvalid:
            for offset, text in enumerate(stripped.to_pylist()):
                if text is None:
                    continue
                try:
                    float(text)
                except ValueError:
                    loc.fail(offset, column, f"{quote(text)} is not a number")
            raise
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        array = array.cast(pa.float64())
    else:
        raise TrecError(f"{loc.file}: column {column}: type {kind} is not a numeric type")
    values = array.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    if allow_missing:
        _check_finite(values, array.is_valid().to_numpy(zero_copy_only=False), loc, column)
    return values


def _check_finite(values: np.ndarray, present: np.ndarray, loc: Location, column: str) -> None:
    """A present value must be finite: NaN or inf in a numeric feature would poison every model that reads it.

    (A missing value, an empty field or a null, is allowed: it becomes NaN only after this check.)
    Callers without ``allow_missing`` range-check their values themselves (check_rating, check_range).
    """
    bad = np.flatnonzero(present & ~np.isfinite(values))
    if len(bad):
        loc.fail(bad[0], column, f"{format_number(values[bad[0]])} is not a finite number "
                                 "(leave the field empty for a missing value)")


def check_rating(values: np.ndarray, loc: Location, column: str, high: float | None = None) -> None:
    """Ratings must be numbers >= 0 (and <= ``high`` when the source defines a scale)."""
    nan = np.flatnonzero(np.isnan(values))
    if len(nan):
        loc.fail(nan[0], column, "NaN is not a valid rating")
    negative = np.flatnonzero(values < 0)
    if len(negative):
        loc.fail(negative[0], column, f"{format_number(values[negative[0]])} is negative")
    limit = np.inf if high is None else high
    above = np.flatnonzero(~(values <= limit) | np.isinf(values))  # inf <= inf: the bound alone lets it pass
    if len(above):
        bound = "finite" if high is None else f"<= {format_number(high)}"
        loc.fail(above[0], column, f"{format_number(values[above[0]])} is out of range (must be {bound})")


def check_range(values: np.ndarray, loc: Location, column: str, low: float, high: float) -> None:
    """Every value within [low, high] (NaN included in the failures)."""
    bad = np.flatnonzero(~((values >= low) & (values <= high)))
    if len(bad):
        value = format_number(float(values[bad[0]]))
        loc.fail(bad[0], column, f"{value} is out of range [{format_number(low)}, {format_number(high)}]")


def to_timestamp(array: pa.Array, loc: Location, column: str) -> np.ndarray:
    """Event times → int64 seconds since the epoch: integers, Parquet timestamps/dates, or ISO-8601 text.

    Negative times are rejected: they are almost always a unit or parsing mistake.
    """
    kind = array.type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        _check_present(array, loc, column)
        seconds = pc.cast(array, pa.timestamp("s"), safe=False)
        values = seconds.cast(pa.int64()).to_numpy(zero_copy_only=False)
    elif is_text and not pc.all(pc.match_substring_regex(array.cast(pa.string()), INT_PATTERN)).as_py():
        _check_present(array, loc, column)
        text = pc.utf8_trim_whitespace(array.cast(pa.string()))
        try:
            values = text.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            for offset, value in enumerate(text.to_pylist()):
                try:
                    pa.array([value]).cast(pa.timestamp("s"))
                except pa.ArrowInvalid:
                    loc.fail(offset, column, f"{quote(value)} is not an integer or ISO-8601 time")
            raise
    else:
        values = to_int64(array, loc, column).to_numpy()  # checks for missing values itself
    negative = np.flatnonzero(values < 0)
    if len(negative):
        loc.fail(negative[0], column, f"{values[negative[0]]} is out of range (must be >= 0)")
    return values.astype(np.int64, copy=False)


def id_array(array: pa.Array, loc: Location, column: str) -> pa.Array:
    """A raw ID column as int64 (any integer type) or string; nulls and other types are errors."""
    _check_present(array, loc, column)
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    if pa.types.is_integer(kind):
        return to_int64(array, loc, column)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return array.cast(pa.string())
    raise TrecError(f"{loc.file}: column {column}: type {kind} cannot hold IDs (use integers or strings)")


def category_array(array: pa.Array, loc: Location, column: str) -> pa.Array:
    """A categorical value column as int64 or string; nulls mean 'missing' (mapped to OOV later)."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    if pa.types.is_boolean(kind):
        return array.cast(pa.int64())
    if pa.types.is_integer(kind):
        _check_int64_range(array, loc, column)
        return array.cast(pa.int64())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = array.cast(pa.string())
        return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    raise TrecError(f"{loc.file}: column {column}: type {kind} cannot hold categories (use integers or strings)")


def multi_hot_array(array: pa.Array, loc: Location, column: str, separator: str) -> pa.Array:
    """A multi-valued column (a list, or text split by ``separator``) → list<int64|string>.

    Missing values become empty lists; empty elements ('a||b') and null elements are dropped.
    """
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        array = pc.split_pattern(array.cast(pa.string()), pattern=separator)
        kind = array.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise TrecError(f"{loc.file}: column {column}: type {kind} is not a list or separated text")
    array = array.cast(pa.list_(array.type.value_type))
    values = category_array(pc.list_flatten(array), loc, column)
    parents = pc.list_parent_indices(array).to_numpy()
    keep = values.is_valid().to_numpy(zero_copy_only=False)
    lengths = np.bincount(parents[keep], minlength=len(array))
    offsets = np.zeros(len(array) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(keep)))
