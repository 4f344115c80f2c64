"""The feedback event log (trec/serving/events.py): rotation, durability across a SIGKILL, recovery that
never takes a live writer's WAL, and the real feedback → prepare → train pipeline over its files."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.readers import resolve_files
from trec.errors import TrecError
from trec.serving import events as events_module
from trec.serving.events import DEFAULT_EVENT_LABELS, EventLog, FeedbackEvent, parse_event_labels

sys.path.insert(0, str(Path(__file__).parent))
from training import REPO, child_env, run_command, trec_command  # noqa: E402


def make_events(count: int, start: int = 0, **extra) -> list[FeedbackEvent]:
    return [FeedbackEvent(f"u{n}", f"i{n % 7}", "click", 0.5, 1_700_000_000 + n, **extra)
            for n in range(start, start + count)]


def parquet_files(directory: Path) -> list[Path]:
    files, _ = resolve_files(str(directory), (".parquet",), "parquet")  # what `trec data prepare parquet` reads
    return files


def any_parquet(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.parquet"))


def read_rows(directory: Path) -> list[dict]:
    return [row for path in parquet_files(directory) for row in pq.read_table(path).to_pylist()]


# ---- rotation ---------------------------------------------------------------------------------


def test_rotation_by_rows_writes_complete_files_with_the_schema(tmp_path, monkeypatch):
    seen_during_write = []
    write_table = events_module.pq.write_table

    def watching(table, where, **kwargs):  # what a concurrent reader would see mid-rotation
        seen_during_write.append(sorted(os.listdir(tmp_path)))
        write_table(table, where, **kwargs)

    monkeypatch.setattr(events_module.pq, "write_table", watching)
    log = EventLog(tmp_path, context_names=["device", "page"], max_rows=4, max_age_s=3600)
    log.append(make_events(3, context={"device": "ios"}))
    assert any_parquet(tmp_path) == [] and log.stats["rows_buffered"] == 3
    log.append(make_events(2, start=3, experiment="exp1", arm="b"))  # 5 >= 4 rows: rotates
    log.append(make_events(4, start=5, context={"page": "home", "device": "web"}))
    assert log.stats == {"rows_appended": 9, "files_written": 2, "rows_buffered": 0, "rows_recovered": 0}
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.append(make_events(1))

    # Mid-write the file exists only under a temporary name no reader takes for Parquet.
    for listing in seen_during_write:
        assert not any(name.endswith(".parquet") and name.startswith(".") for name in listing), listing
        assert any(name.startswith(".events-") and name.endswith(".tmp") for name in listing), listing
    files = parquet_files(tmp_path)
    assert len(files) == 2 and sorted(os.listdir(tmp_path)) == [path.name for path in files]  # WAL and temps gone
    for path in files:
        assert path.name.startswith("events-") and f"-{os.getpid()}-" in path.name
        schema = pq.read_schema(path)
        assert schema.names == ["user_id", "item_id", "event", "label", "timestamp", "experiment", "arm",
                                "device", "page"]
        assert [str(schema.field(n).type) for n in ("label", "timestamp", "device")] == ["float", "int64", "string"]
    rows = read_rows(tmp_path)
    assert [row["user_id"] for row in rows] == [f"u{n}" for n in range(9)]
    assert rows[0] == {"user_id": "u0", "item_id": "i0", "event": "click", "label": 0.5, "timestamp": 1_700_000_000,
                       "experiment": None, "arm": None, "device": "ios", "page": None}
    assert (rows[3]["experiment"], rows[3]["arm"], rows[3]["device"]) == ("exp1", "b", None)
    assert (rows[8]["device"], rows[8]["page"]) == ("web", "home")


def test_rotation_by_age_even_without_new_events(tmp_path):
    log = EventLog(tmp_path, max_rows=1000, max_age_s=0.3, fsync=False)
    log.append(make_events(2))
    log.maybe_rotate()
    assert log.stats["files_written"] == 0  # too young
    time.sleep(0.35)
    log.maybe_rotate()  # the app's timer
    assert log.stats["files_written"] == 1 and len(read_rows(tmp_path)) == 2
    log.append(make_events(1, start=2))
    time.sleep(0.35)
    log.append(make_events(1, start=3))  # the oldest buffered row is old: this append rotates both
    assert log.stats["files_written"] == 2 and log.stats["rows_buffered"] == 0
    log.close()
    assert log.stats["files_written"] == 2  # nothing buffered: no empty file (prepare refuses those)
    assert [row["user_id"] for row in read_rows(tmp_path)] == ["u0", "u1", "u2", "u3"]


# ---- durability and recovery ------------------------------------------------------------------

WRITER = """
import sys, time
from trec.serving.events import EventLog, FeedbackEvent
log = EventLog(sys.argv[1], context_names=["device"], max_rows=1000, max_age_s=3600, fsync=True)
for n in range(5):
    log.append([FeedbackEvent(f"u{n}", "i1", "like", 0.9, 1700000000 + n, {"device": "tv"}, "exp", "a")])
print("appended", flush=True)
time.sleep(600)
"""


def test_events_survive_sigkill_and_a_live_writer_is_never_recovered(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=child_env(), cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "appended"
        wal = [name for name in os.listdir(tmp_path) if name.startswith(".wal-")]
        assert wal == [f".wal-{child.pid}-0.jsonl"]
        # Another worker opening the directory while the writer lives leaves its WAL alone.
        other = EventLog(tmp_path, context_names=["device"])
        assert other.stats["rows_recovered"] == 0 and any_parquet(tmp_path) == []
        assert (tmp_path / wal[0]).exists()
        other.close()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL  # it died before any rotation

    recovered = EventLog(tmp_path, context_names=["device"])
    assert recovered.stats["rows_recovered"] == 5 and not (tmp_path / wal[0]).exists()
    (path,) = parquet_files(tmp_path)
    assert path.name.endswith(f"-{child.pid}-0.parquet")  # named after the dead writer's WAL
    rows = pq.read_table(path).to_pylist()
    assert rows == [{"user_id": f"u{n}", "item_id": "i1", "event": "like", "label": pytest.approx(0.9),
                     "timestamp": 1700000000 + n, "experiment": "exp", "arm": "a", "device": "tv"} for n in range(5)]
    recovered.close()
    assert EventLog(tmp_path).stats["rows_recovered"] == 0  # nothing left to recover: no duplicates


def test_recovery_skips_a_torn_last_line_and_cleans_up(tmp_path, caplog):
    good = [{"user_id": f"u{n}", "item_id": "i", "event": "view", "label": 0.4, "timestamp": n, "context": {"x": "1"},
             "experiment": None, "arm": None} for n in range(2)]
    lines = "".join(json.dumps(row) + "\n" for row in good)
    (tmp_path / ".wal-999999-3.jsonl").write_text(lines + '{"user_id": "u2", "item_')  # crash mid-write
    stale = tmp_path / ".events-20261202T000000-999999-3.parquet.0123abcd.tmp"  # its cut-short rotation
    stale.write_bytes(b"PAR1 half")
    other_writer_tmp = tmp_path / ".events-20261202T000000-1999999-3.parquet.0123abcd.tmp"  # not this WAL's
    other_writer_tmp.write_bytes(b"PAR1 half")
    # A writer killed after renaming its Parquet file, before deleting its WAL: already published.
    (tmp_path / ".wal-999999-4.jsonl").write_text(lines)
    (tmp_path / "events-20261202T000000-999999-4.parquet").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="trec.serving"):
        log = EventLog(tmp_path)  # no context names: the WAL's context key "x" is dropped
    assert "torn last line" in caplog.text and log.stats["rows_recovered"] == 2
    assert not stale.exists() and other_writer_tmp.exists()
    assert not list(tmp_path.glob(".wal-*"))
    (recovered,) = [p for p in parquet_files(tmp_path) if "-999999-3." in p.name]
    assert pq.read_table(recovered).column("user_id").to_pylist() == ["u0", "u1"]
    assert "x" not in pq.read_schema(recovered).names
    log.close()


# ---- bad input ------------------------------------------------------------------------------------


def test_parse_event_labels():
    assert parse_event_labels("purchase=1, like=0.9,click=0.5") == {"purchase": 1.0, "like": 0.9, "click": 0.5}
    assert parse_event_labels(",".join(f"{k}={v}" for k, v in DEFAULT_EVENT_LABELS.items())) == DEFAULT_EVENT_LABELS
    for text, entry in [("purchase=1,Like=0.9", "'Like=0.9'"), ("purchase", "'purchase'"), ("a=1.5", "'a=1.5'"),
                        ("a=nan", "'a=nan'"), ("a=inf", "'a=inf'"), ("a=-0.1", "'a=-0.1'"), ("a=x", "'a=x'"),
                        ("a=1,,b=0", "''"), ("a=1,a=0", "'a=0'"), ("9a=1", "'9a=1'")]:
        with pytest.raises(TrecError) as error:
            parse_event_labels(text)
        assert entry in str(error.value) and "\n" not in str(error.value), (text, str(error.value))


def test_bad_events_are_refused_before_anything_is_written(tmp_path):
    log = EventLog(tmp_path, context_names=["device"])
    good = make_events(1)[0]
    bad = [(FeedbackEvent("u", "i", "click", 0.5, 1, {"color": "red"}), "unknown context key 'color'"),
           (FeedbackEvent("u", "i", "click", 1.5, 1), "label is not"),
           (FeedbackEvent("u", "i", "click", float("nan"), 1), "label is not"),
           (FeedbackEvent("u", "i", "click", 0.5, -1), "timestamp is not"),
           (FeedbackEvent("u", "i", "click", 0.5, 1.5), "timestamp is not"),
           (FeedbackEvent(7, "i", "click", 0.5, 1), "user_id is not")]
    for event, message in bad:
        with pytest.raises(ValueError, match=message):
            log.append([good, event])
    assert log.stats["rows_appended"] == 0 and not list(tmp_path.iterdir())
    with pytest.raises(TrecError, match="bad context name 'label'"):
        EventLog(tmp_path, context_names=["label"])
    with pytest.raises(TrecError, match="bad context name 'device'"):
        EventLog(tmp_path, context_names=["device", "device"])
    log.close()


# ---- feedback → trec data prepare parquet --------------------------------------------------


def test_feedback_log_prepares_with_its_labels(tmp_path):
    rng = np.random.default_rng(15)
    names = list(DEFAULT_EVENT_LABELS)
    count, users, items = 6000, 200, 120
    kinds = rng.choice(names, size=count, p=[0.1, 0.15, 0.35, 0.3, 0.1])
    user = rng.integers(0, users, count)
    item = rng.integers(0, items, count)
    log_dir = tmp_path / "feedback"
    log = EventLog(log_dir, context_names=["device"], max_rows=1500, fsync=False)
    for start in range(0, count, 250):  # requests of 250 events
        log.append([FeedbackEvent(f"user{user[n]}", f"item{item[n]}", str(kinds[n]), DEFAULT_EVENT_LABELS[kinds[n]],
                                  1_700_000_000 + n, {"device": ["ios", "web"][n % 2]})
                    for n in range(start, start + 250)])
    log.close()
    assert log.stats["files_written"] == 4 and len(parquet_files(log_dir)) == 4

    data = tmp_path / "data"
    run_command(trec_command(1, "data", "prepare", "parquet", "--source", log_dir, "--out", data,
                             "--label-col", "label", "--time-col", "timestamp", "--val-fraction", "0.1", "--quiet"))
    manifest = json.loads((data / "manifest.json").read_text())
    # --duplicates keep (the default) and no --min-count: every event is one interaction.
    assert manifest["num_interactions"] == count and manifest["dropped"] == {"duplicates": 0, "min_count": 0}
    assert manifest["has_label"] is True and manifest["num_users"] == len(set(user))
    labels = np.concatenate([pq.read_table(path, columns=["label"]).column("label").to_numpy()
                             for split in ("train", "val", "test") for path in (data / split).glob("*.parquet")])
    assert len(labels) == count
    # The labels are the events' own: dislikes (0.0) and views (0.4) stay below the 0.5 positive threshold.
    expected = np.sort(np.array([DEFAULT_EVENT_LABELS[k] for k in kinds], np.float32))
    np.testing.assert_array_equal(np.sort(labels), expected)
    assert (labels < manifest["history_positive_threshold"]).sum() == np.isin(kinds, ["dislike", "view"]).sum() > 0

    # Training on such a log over HTTP: tests/test_online.py::test_feedback_log_prepares_and_trains.
