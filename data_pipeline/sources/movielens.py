"""MovieLens (GroupLens) directories in the three layouts users have, detected by their files.

=========  ===========================================  =========================================
layout     files                                        format
=========  ===========================================  =========================================
ml-100k    u.data, u.user, u.item                       tab / '|' separated, u.item in latin-1
ml-1m      ratings.dat, users.dat, movies.dat           '::' separated, latin-1
ml-csv     ratings.csv, movies.csv (ML-20M/25M/latest)  CSV with a header, UTF-8 (no user file)
=========  ===========================================  =========================================

Side features: ``user_age`` (age bucket, the ML-1M groups 1/18/25/35/45/50/56), ``user_gender``,
``user_occupation``, ``user_zip`` (first three characters of the zip code), ``item_genres``
(multi-hot), ``item_year`` (numeric release year, from the title's "(1995)" or the release
date) and the display ``title``. Every rating is kept as ``rating`` (0.5-5) and counts as a
positive interaction.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.readers import TextFormat, check_columns, read_text, text_header
from data_pipeline.sources import NUMERIC, RawFeature, Source
from data_pipeline.validate import (Location, check_range, check_rating, multi_hot_array, to_float64, to_int64,
                                     to_timestamp)
from trec.errors import TrecError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
# ML-1M's age groups; ML-100K's exact ages are bucketed the same way so the feature means one thing.
AGE_BUCKETS = np.array([1, 18, 25, 35, 45, 50, 56])

_RATINGS = ("user_id", "item_id", "rating", "timestamp")
_LAYOUTS = {
    "ml-100k": {
        "files": ("u.data", "u.user", "u.item"),
        "name": "ML-100K",
        "ratings": ("u.data", TextFormat("\t", _RATINGS)),
        "users": ("u.user", TextFormat("|", ("user_id", "age", "gender", "occupation", "zip_code"), "latin-1")),
        "items": (
            "u.item",
            TextFormat("|", ("item_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES),
                       "latin-1"),
        ),
    },
    "ml-1m": {
        "files": ("ratings.dat", "users.dat", "movies.dat"),
        "name": "ML-1M",
        "ratings": ("ratings.dat", TextFormat("::", _RATINGS)),
        "users": ("users.dat", TextFormat("::", ("user_id", "gender", "age", "occupation", "zip_code"), "latin-1")),
        "items": ("movies.dat", TextFormat("::", ("item_id", "title", "genres"), "latin-1")),
    },
    "ml-csv": {
        "files": ("ratings.csv", "movies.csv"),
        "name": "ML-20M/25M/latest",
        "ratings": ("ratings.csv", TextFormat(",", quoting=True)),
        "users": None,
        "items": ("movies.csv", TextFormat(",", quoting=True)),
    },
}
_CSV_COLUMNS = {"user_id": "userId", "item_id": "movieId", "rating": "rating", "timestamp": "timestamp"}


def detect_layout(directory: Path) -> str:
    """The layout whose ratings file is present; its other files must be there too."""
    if not directory.is_dir():
        raise TrecError(f"{directory}: no such directory")
    for layout, spec in _LAYOUTS.items():
        if (directory / spec["files"][0]).is_file():
            missing = [name for name in spec["files"] if not (directory / name).is_file()]
            if missing:
                raise TrecError(
                    f"{directory}: {spec['name']} layout ({spec['files'][0]} found) is missing {', '.join(missing)}"
                )
            return layout
    expected = "; ".join(f"{', '.join(spec['files'])} ({spec['name']})" for spec in _LAYOUTS.values())
    raise TrecError(f"{directory}: not a MovieLens directory: expected one of: {expected}")


def _read_all(path: Path, fmt: TextFormat) -> tuple[pa.Table, np.ndarray]:
    """A small side file as one table of strings, plus the line number of every row."""
    batches, lines = [], []
    with contextlib.closing(read_text(path, path.name, fmt)) as reader:  # closes the file's reader on an error too
        for batch, loc in reader:
            batches.append(batch)
            lines.append(loc.first + np.arange(batch.num_rows))
    return pa.Table.from_batches(batches).combine_chunks(), np.concatenate(lines)


def _at_lines(file: str, lines: np.ndarray) -> Location:
    return Location(file, "line", 0, lines)


def _unique_ids(ids: pa.Array, loc: Location, column: str) -> None:
    values = ids.to_numpy()
    _, first, counts = np.unique(values, return_index=True, return_counts=True)
    if (counts > 1).any():
        seen = np.zeros(len(values), bool)
        seen[first] = True
        duplicate = int(np.flatnonzero(~seen)[0])
        loc.fail(duplicate, column, f"duplicate ID {values[duplicate]}")


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Exact ages → the ML-1M group they fall in (under 18 → 1, 18-24 → 18, ..., 56+ → 56)."""
    return AGE_BUCKETS[np.searchsorted(AGE_BUCKETS, age, side="right") - 1].astype(np.int64)


def release_year(titles: pa.Array, dates: pa.Array | None = None) -> np.ndarray:
    """float64 year from a title ending in '(1995)', else from a release date ending in the year;
    NaN when neither has one."""
    found = pc.extract_regex(titles, r"\((?P<year>\d{4})\)\s*$").field("year")
    year = to_float64(found, Location("", "line", 0), "year", allow_missing=True)
    if dates is not None:
        from_date = pc.extract_regex(dates, r"(?P<year>\d{4})\s*$").field("year")
        year = np.where(np.isnan(year), to_float64(from_date, Location("", "line", 0), "year", allow_missing=True), year)
    return year


class MovieLensSource(Source):
    kind = "movielens"
    has_rating = True
    rating_max = 5.0

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.layout = detect_layout(self.directory)
        self.path = str(self.directory.resolve())
        self.spec = _LAYOUTS[self.layout]
        # Side files are small: read (and validate) them before any interaction is processed.
        self._users = self._read_users() if self.spec["users"] else None
        self._items = self._read_items()
        if self._users is not None:
            self.features += [
                RawFeature("user_age", "user"),
                RawFeature("user_gender", "user"),
                RawFeature("user_occupation", "user"),
                RawFeature("user_zip", "user"),
            ]
        self.features += [RawFeature("item_genres", "item", multi_hot=True), RawFeature("item_year", "item", NUMERIC)]

    # ---- interactions -------------------------------------------------------------------

    def interactions(self) -> Iterator[pa.RecordBatch]:
        name, fmt = self.spec["ratings"]
        path = self.directory / name
        columns = dict(zip(_RATINGS, _RATINGS))
        if not fmt.names:
            columns = _CSV_COLUMNS
            check_columns(name, text_header(path, name, fmt), list(columns.values()))
        for batch, loc in read_text(path, name, fmt):
            yield self._interaction_batch(batch, loc, columns)

    def _interaction_batch(self, batch: pa.RecordBatch, loc: Location, columns: dict) -> pa.RecordBatch:
        rating = to_float64(batch.column(columns["rating"]), loc, columns["rating"])
        user = to_int64(batch.column(columns["user_id"]), loc, columns["user_id"])
        item = to_int64(batch.column(columns["item_id"]), loc, columns["item_id"])
        check_rating(rating, loc, columns["rating"], high=self.rating_max)
        timestamp = to_timestamp(batch.column(columns["timestamp"]), loc, columns["timestamp"])
        return pa.record_batch(
            {"user": user, "item": item, "timestamp": timestamp, "rating": rating.astype(np.float32)}
        )

    def side_table(self, entity: str) -> pa.Table | None:
        return self._users if entity == "user" else self._items

    # ---- side files ---------------------------------------------------------------------

    def _read_users(self) -> pa.Table:
        name, fmt = self.spec["users"]
        table, lines = _read_all(self.directory / name, fmt)
        loc = _at_lines(name, lines)
        ids = to_int64(table["user_id"].combine_chunks(), loc, "user_id")
        _unique_ids(ids, loc, "user_id")
        age = to_int64(table["age"].combine_chunks(), loc, "age").to_numpy()
        check_range(age.astype(np.float64), loc, "age", 0, 150)
        occupation = table["occupation"].combine_chunks()
        if self.layout == "ml-1m":  # occupations are numeric codes there, names in ML-100K
            occupation = to_int64(occupation, loc, "occupation")
        zip_prefix = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(table["zip_code"].combine_chunks()), 0, 3)
        return pa.table({
            "id": ids,
            "user_age": pa.array(age_bucket(age)),
            "user_gender": _none_if_empty(table["gender"].combine_chunks()),
            "user_occupation": occupation,
            "user_zip": _none_if_empty(zip_prefix),
        })

    def _read_items(self) -> pa.Table:
        name, fmt = self.spec["items"]
        path = self.directory / name
        if not fmt.names:
            check_columns(name, text_header(path, name, fmt), ["movieId", "title", "genres"])
        table, lines = _read_all(path, fmt)
        loc = _at_lines(name, lines)
        id_column = "item_id" if fmt.names else "movieId"
        ids = to_int64(table[id_column].combine_chunks(), loc, id_column)
        _unique_ids(ids, loc, id_column)
        titles = pc.utf8_trim_whitespace(table["title"].combine_chunks())
        if self.layout == "ml-100k":
            flags = [to_int64(table[g].combine_chunks(), loc, g).to_numpy() for g in ML100K_GENRES]
            genres = _genres_from_flags(np.stack(flags, axis=1), loc)
            year = release_year(titles, table["release_date"].combine_chunks())
        else:
            # ML-20M writes '(no genres listed)': an empty list, not a genre.
            no_genre = pc.replace_substring(table["genres"].combine_chunks(), "(no genres listed)", "")
            genres = multi_hot_array(no_genre, loc, "genres", "|")
            year = release_year(titles)
        return pa.table({
            "id": ids,
            "item_genres": genres,
            "item_year": pa.array(year, pa.float64()),
            "title": titles,
        })


def _none_if_empty(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def _genres_from_flags(flags: np.ndarray, loc: Location) -> pa.Array:
    """(I X 19) 0/1 genre flags → list<string> of the genre names set."""
    bad_row, bad_col = np.nonzero((flags != 0) & (flags != 1))
    if len(bad_row):
        loc.fail(bad_row[0], ML100K_GENRES[bad_col[0]], f"{flags[bad_row[0], bad_col[0]]} is out of range [0, 1]")
    rows, cols = np.nonzero(flags)
    offsets = np.zeros(len(flags) + 1, np.int32)
    np.cumsum(flags.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.array(ML100K_GENRES, dtype=object)[cols], pa.string()))
