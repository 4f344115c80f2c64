"""Bad input to `trec data prepare`: one exact error line naming file, line/row and column, and no output left."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare import prepare_dataset
from data_pipeline.sources import build_source
from trec.config import PrepareConfig
from trec.errors import TrecError

GOOD = "1\t1\t3\t881250949\n2\t2\t4\t881250950\n1\t2\t5\t881250951\n"
USERS = "1|24|M|technician|85711\n2|53|F|other|94043\n"
ITEMS = (
    "1|Toy Story (1995)||||0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|GoldenEye (1995)||||0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n"
)


def ml100k_dir(root: Path, data: str, users: str = USERS, items: str = ITEMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text(data)
    (root / "u.user").write_text(users)
    (root / "u.item").write_text(items)
    return root


def prepare_error(tmp_path: Path, kind: str, source: Path | str, **columns) -> str:
    """Run prepare, expect a TrecError, check nothing was left beside --out; return the message."""
    options = PrepareConfig()
    for key, value in columns.items():
        setattr(options.columns, key, value)
    out = tmp_path / "out"
    with pytest.raises(TrecError) as info:
        prepare_dataset(build_source(kind, str(source), options), out, options)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "line, expected",
    [
        ("2\tabc\t3\t5\n", "u.data line 4: column item_id: 'abc' is not an integer"),
        ("x2\t1\t3\t5\n", "u.data line 4: column user_id: 'x2' is not an integer"),
        ("\t1\t3\t5\n", "u.data line 4: column user_id: missing value"),
        ("2\t1\t-1\t5\n", "u.data line 4: column rating: -1 is negative"),
        ("2\t1\tnan\t5\n", "u.data line 4: column rating: NaN is not a valid rating"),
        ("2\t1\tfive\t5\n", "u.data line 4: column rating: 'five' is not a number"),
        ("2\t1\t7\t5\n", "u.data line 4: column rating: 7 is out of range (must be <= 5)"),
        ("2\t1\t3\t-5\n", "u.data line 4: column timestamp: -5 is out of range (must be >= 0)"),
        ("2\t99999999999999999999\t3\t5\n",
         "u.data line 4: column item_id: '99999999999999999999' is out of range for int64"),
        ("2\t1\t3\n", "u.data line 4: expected 4 tab-separated fields (user_id, item_id, rating, timestamp), got 3"),
        ("2\t1\t3\t5\t9\n",
         "u.data line 4: expected 4 tab-separated fields (user_id, item_id, rating, timestamp), got 5"),
    ],
)
def test_bad_movielens_rating_line(tmp_path, line, expected):
    source = ml100k_dir(tmp_path / "ml", GOOD + line)
    assert prepare_error(tmp_path, "movielens", source) == expected


def test_line_numbers_stay_exact_after_blank_lines(tmp_path):
    source = ml100k_dir(tmp_path / "ml", GOOD + "\n\n2\tabc\t3\t5\n")
    assert prepare_error(tmp_path, "movielens", source) == "u.data line 6: column item_id: 'abc' is not an integer"


def test_empty_movielens_file(tmp_path):
    source = ml100k_dir(tmp_path / "ml", "")
    assert prepare_error(tmp_path, "movielens", source) == "u.data: empty file (no rows)"


def test_bad_side_file_names_its_line(tmp_path):
    source = ml100k_dir(tmp_path / "ml", GOOD, users=USERS + "3|old|M|writer|32067\n")
    assert prepare_error(tmp_path, "movielens", source) == "u.user line 3: column age: 'old' is not an integer"
    source = ml100k_dir(tmp_path / "ml2", GOOD, users=USERS + "2|30|F|other|94043\n")
    assert prepare_error(tmp_path, "movielens", source) == "u.user line 3: column user_id: duplicate ID 2"
    source = ml100k_dir(tmp_path / "ml3", GOOD, items=ITEMS + "3|Heat (1995)||||0|2\n")
    assert prepare_error(tmp_path, "movielens", source).startswith("u.item line 3: expected 24 '|'-separated fields")


def test_mismatched_layouts(tmp_path):
    (tmp_path / "none").mkdir()
    assert prepare_error(tmp_path, "movielens", tmp_path / "none") == (
        f"{tmp_path / 'none'}: not a MovieLens directory: expected one of: u.data, u.user, u.item (ML-100K); "
        "ratings.dat, users.dat, movies.dat (ML-1M); ratings.csv, movies.csv (ML-20M/25M/latest)"
    )
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "u.data").write_text(GOOD)
    assert prepare_error(tmp_path, "movielens", partial) == (
        f"{partial}: ML-100K layout (u.data found) is missing u.user, u.item"
    )
    ml1m = tmp_path / "ml1m"
    ml1m.mkdir()
    (ml1m / "ratings.dat").write_text("1::1::5::978300760\n1::2::3\n")
    (ml1m / "users.dat").write_text("1::F::1::10::48067\n")
    (ml1m / "movies.dat").write_text("1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Action\n")
    assert prepare_error(tmp_path, "movielens", ml1m) == (
        "ratings.dat line 2: expected 4 '::'-separated fields (user_id, item_id, rating, timestamp), got 3"
    )


def test_missing_column_in_parquet(tmp_path):
    pq.write_table(pa.table({"user_id": [1, 2], "movie": [1, 2], "timestamp": [1, 2]}), tmp_path / "ratings.parquet")
    assert prepare_error(tmp_path, "parquet", tmp_path / "ratings.parquet") == (
        "ratings.parquet: missing column 'item_id' (columns: user_id, movie, timestamp)"
    )


def test_nan_and_negative_rating_in_parquet(tmp_path):
    table = {"user_id": [1, 2, 3], "item_id": [1, 2, 3], "timestamp": [1, 2, 3]}
    pq.write_table(pa.table({**table, "stars": [1.0, 2.0, float("nan")]}), tmp_path / "nan.parquet")
    assert prepare_error(tmp_path, "parquet", tmp_path / "nan.parquet", rating="stars") == (
        "nan.parquet row 2: column stars: NaN is not a valid rating"
    )
    pq.write_table(pa.table({**table, "stars": [1.0, -0.5, 3.0]}), tmp_path / "neg.parquet")
    assert prepare_error(tmp_path, "parquet", tmp_path / "neg.parquet", rating="stars") == (
        "neg.parquet row 1: column stars: -0.5 is negative"
    )


def test_truncated_and_empty_parquet(tmp_path):
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, 2]}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    assert prepare_error(tmp_path, "parquet", tmp_path / "cut.parquet") == (
        "cut.parquet: truncated or corrupt Parquet file (cannot read its footer)"
    )
    (tmp_path / "zero.parquet").write_bytes(b"")
    assert prepare_error(tmp_path, "parquet", tmp_path / "zero.parquet") == "zero.parquet: empty file (no rows)"
    empty = pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
                      "timestamp": pa.array([], pa.int64())})
    pq.write_table(empty, tmp_path / "norows.parquet")
    assert prepare_error(tmp_path, "parquet", tmp_path / "norows.parquet") == "norows.parquet: empty file (no rows)"


def test_bad_file_inside_a_directory_is_named_relative_to_it(tmp_path):
    logs = tmp_path / "logs" / "day2"
    logs.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [1], "item_id": [1], "timestamp": [1]}), tmp_path / "logs" / "a.parquet")
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, None], "timestamp": [1, 2]}), logs / "b.parquet")
    assert prepare_error(tmp_path, "parquet", tmp_path / "logs") == "day2/b.parquet row 1: column item_id: missing value"


def test_bad_csv_values(tmp_path):
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp,label\n1,2,3,1\n1,3,4,1.5\n")
    assert prepare_error(tmp_path, "csv", tmp_path / "events.csv", label="label") == (
        "events.csv line 3: column label: 1.5 is out of range [0, 1]"
    )
    (tmp_path / "header.csv").write_text("user_id,item_id,timestamp\n")
    assert prepare_error(tmp_path, "csv", tmp_path / "header.csv") == "header.csv: empty file (no rows)"
    (tmp_path / "times.csv").write_text("user_id,item_id,timestamp\nu1,i1,2020-01-01T00:00:00\nu2,i2,yesterday\n")
    assert prepare_error(tmp_path, "csv", tmp_path / "times.csv") == (
        "times.csv line 3: column timestamp: 'yesterday' is not an integer or ISO-8601 time"
    )
    (tmp_path / "ids.csv").write_text("user_id,item_id,timestamp\n1,1,5\n2,x,6\n")
    assert prepare_error(tmp_path, "csv", tmp_path / "ids.csv", id_type="int") == (
        "ids.csv line 3: column item_id: 'x' is not an integer"
    )
    (tmp_path / "cols.csv").write_text("user,item_id,timestamp\n1,1,5\n")
    assert prepare_error(tmp_path, "csv", tmp_path / "cols.csv") == (
        "cols.csv: missing column 'user_id' (columns: user, item_id, timestamp)"
    )
    (tmp_path / "short.csv").write_text("user_id,item_id,timestamp\n1,1,5\n1,2\n")
    assert prepare_error(tmp_path, "csv", tmp_path / "short.csv") == (
        "short.csv line 3: expected 3 comma-separated fields (user_id, item_id, timestamp), got 2"
    )


def test_existing_output_is_not_touched(tmp_path):
    source = ml100k_dir(tmp_path / "ml", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    options = PrepareConfig()
    with pytest.raises(TrecError, match=r"out: already exists \(pass --overwrite to replace it\)"):
        prepare_dataset(build_source("movielens", str(source), options), out, options)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_overwrite_keeps_the_previous_dataset(tmp_path):
    out = tmp_path / "out"
    options = PrepareConfig()
    prepare_dataset(build_source("movielens", str(ml100k_dir(tmp_path / "ok", GOOD)), options), out, options)
    before = (out / "manifest.json").read_text()
    bad = ml100k_dir(tmp_path / "bad", GOOD + "2\tabc\t3\t5\n")
    with pytest.raises(TrecError):
        prepare_dataset(build_source("movielens", str(bad), options), out, options, overwrite=True)
    assert (out / "manifest.json").read_text() == before


def test_cli_prints_one_error_line_and_exits_2(run_trec, tmp_path):
    source = ml100k_dir(tmp_path / "ml", GOOD + "2\tabc\t3\t5\n")
    proc = run_trec("data", "prepare", "movielens", "--source", source, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: u.data line 4: column item_id: 'abc' is not an integer"]
    assert not (tmp_path / "out").exists()
    proc = run_trec("data", "prepare", "parquet", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: 'parquet' needs --source PATH"


def test_bad_options(tmp_path):
    source = ml100k_dir(tmp_path / "ml", GOOD)
    for change, expected in [
        ({"test_fraction": 1.0}, "test_fraction must be in [0, 1), got 1.0"),
        ({"min_count": 0}, "min_count must be >= 1, got 0"),
        ({"hash_features": ["nope:10"]}, "hash_features: 'nope' is not a categorical feature of this source"),
        ({"hash_features": ["user_zip"]}, "hash_features: 'user_zip' must be NAME:BUCKETS with BUCKETS >= 1"),
    ]:
        options = PrepareConfig(**change)
        with pytest.raises(TrecError) as info:
            prepare_dataset(build_source("movielens", str(source), options), tmp_path / "out", options)
        assert str(info.value).startswith(expected)
        assert not (tmp_path / "out").exists()


def test_integer_text_forms_that_are_accepted():
    from data_pipeline.validate import Location, to_int64

    loc = Location("f.csv", "line", 2)
    assert to_int64(pa.array(["+5", " 7 ", "0005", "-3"]), loc, "c").to_pylist() == [5, 7, 5, -3]
    with pytest.raises(TrecError, match=r"^f.csv line 3: column c: '-99999999999999999999' is out of range for int64$"):
        to_int64(pa.array(["1", "-99999999999999999999"]), loc, "c")
