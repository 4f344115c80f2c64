"""Hostile and damaged inputs through the real CLI: one ``error:`` line, exit 2, nothing left at --out.

Each case builds its files in a temporary directory and runs ``python -m trec ...`` as a
subprocess (an abort at interpreter exit or a traceback printed by a library would show there
and not in-process). The corpus is table-driven: one row per kind of hostile input. Bad
configs (YAML and values out of range) run in-process through ``trec.cli.main``: the same code
path, without an interpreter start per case. Then: tampered JSON, outputs that cannot be
written (a file in the way, a full or read-only tmpfs), a closed stdout, and user errors under
torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training import REPO, child_env, refusal

HEADER = "user_id,item_id,rating,timestamp\n"
ROWS = "1,10,4,100\n2,20,5,101\n1,20,3,102\n2,10,2,103\n"


def _csv(tmp: Path, text: str | bytes, *flags: str) -> list[str]:
    path = tmp / "log.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["data", "prepare", "csv", "--source", str(path), "--rating-col", "rating", *flags]


def _parquet(tmp: Path, table: pa.Table, *flags: str) -> list[str]:
    path = tmp / "log.parquet"
    pq.write_table(table, path)
    return ["data", "prepare", "parquet", "--source", str(path), *flags]


def _good_table(**replace) -> pa.Table:
    columns = {
        "user_id": pa.array([1, 2, 1, 2], pa.int64()),
        "item_id": pa.array([10, 20, 20, 10], pa.int64()),
        "rating": pa.array([4.0, 5.0, 3.0, 2.0]),
        "timestamp": pa.array([100, 101, 102, 103], pa.int64()),
        "age": pa.array([20.0, 30.0, 20.0, 30.0]),
        "genre": pa.array([1, 2, 2, 1], pa.int64()),
    }
    columns.update(replace)
    return pa.table(columns)


def _yaml(tmp: Path, text: str | bytes, *overrides: str) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["data", "prepare", "synthetic", "--config", str(path), "--users", "50", "--items", "20",
            "--interactions", "500", *overrides]


def _set(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["data", "prepare", "synthetic", "--users", "50", "--items", "20", "--interactions", "500",
                        *[part for item in overrides for part in ("--set", item)]]


def _truncated_parquet(tmp: Path) -> list[str]:
    args = _parquet(tmp, _good_table())
    path = tmp / "log.parquet"
    path.write_bytes(path.read_bytes()[:-30])
    return args


def _duplicate_parquet_columns(tmp: Path) -> list[str]:
    table = pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4]), pa.array([5, 6]), pa.array([0, 1])],
                                 names=["user_id", "item_id", "user_id", "timestamp"])
    return _parquet(tmp, table)


def _parquet_garbage(tmp: Path) -> list[str]:
    path = tmp / "log.parquet"
    path.write_bytes(b"PAR1" + os.urandom(2000) + b"PAR1")
    return ["data", "prepare", "parquet", "--source", str(path)]


def _billion_laughs(tmp: Path) -> list[str]:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return _yaml(tmp, "\n".join(lines) + "\n")


def _movielens(tmp: Path, ratings: bytes) -> list[str]:
    """An ML-100K directory whose u.data is ``ratings`` (u.user and u.item of two valid rows)."""
    source = tmp / "ml"
    source.mkdir()
    (source / "u.data").write_bytes(ratings)
    (source / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    genres = "|0" * 19
    (source / "u.item").write_text(f"1|A (1995)|01-Jan-1995||{genres}\n2|B (1995)|01-Jan-1995||{genres}\n")
    return ["data", "prepare", "movielens", "--source", str(source)]


# (id, build args from a temp dir, text the one error line must contain)
CASES = [
    # --- text encodings and layout -------------------------------------------------------------
    ("csv-not-utf8", lambda t: _csv(t, HEADER.encode() + b"1,10,4,100\n2,\xff\xfe20,5,101\n"), "not valid UTF-8"),
    # a malformed row that is not UTF-8: pyarrow failed to decode it for the invalid-row handler and
    # printed "Exception ignored ..." with a traceback before the error line
    ("ml-ratings-binary", lambda t: _movielens(t, b"\x00\x01\x02\xff\xfe" * 100), "not valid UTF-8"),
    ("csv-header-not-utf8", lambda t: _csv(t, b"user_id,item\xe9_id,rating,timestamp\n1,10,4,100\n"),
     "not valid UTF-8"),
    ("csv-duplicate-columns", lambda t: _csv(t, "user_id,item_id,rating,timestamp,user_id\n1,10,4,100,3\n"),
     "duplicate column name 'user_id'"),
    ("parquet-duplicate-columns", _duplicate_parquet_columns, "duplicate column name 'user_id'"),
    ("csv-huge-field", lambda t: _csv(t, HEADER + "1,10," + "9x" * 500_000 + ",100\n"), "column rating"),
    ("csv-huge-header", lambda t: _csv(t, "user_id," + "c" * 1_000_000 + ",rating,timestamp\n1,2,3,4\n"),
     "line 1"),
    ("delimiter-empty", lambda t: _csv(t, HEADER + ROWS, "--delimiter", ""), "csv_delimiter"),
    ("delimiter-two-chars", lambda t: _csv(t, HEADER + ROWS, "--delimiter", ";;"), "csv_delimiter"),
    ("delimiter-newline", lambda t: _csv(t, HEADER + ROWS, "--delimiter", "\n"), "csv_delimiter"),
    ("delimiter-quote", lambda t: _csv(t, HEADER + ROWS, "--delimiter", '"'), "csv_delimiter"),
    ("separator-empty", lambda t: _csv(t, HEADER + ROWS, "--multi-hot-separator", ""), "multi_hot_separator"),
    ("separator-newline", lambda t: _csv(t, HEADER + ROWS, "--multi-hot-separator", "\n"), "multi_hot_separator"),
    # --- IDs beyond int64 ------------------------------------------------------------------------
    ("csv-id-beyond-int64", lambda t: _csv(t, HEADER + f"1,{2**64 - 1},4,100\n"), "out of range for int64"),
    # int() refuses more than 4300 digits (a ValueError, once a traceback), whatever the range check says
    ("csv-id-thousands-of-digits", lambda t: _csv(t, HEADER + "1," + "9" * 5000 + ",4,100\n"),
     "out of range for int64"),
    ("ml-time-thousands-of-digits", lambda t: _movielens(t, b"1\t1\t3\t" + b"9" * 100_000 + b"\n"),
     "out of range for int64"),
    ("parquet-uint64-id", lambda t: _parquet(t, _good_table(item_id=pa.array([10, 2**64 - 1, 1, 2], pa.uint64()))),
     "out of range for int64"),
    ("parquet-uint64-feature",
     lambda t: _parquet(t, _good_table(genre=pa.array([1, 2**63, 1, 2], pa.uint64())), "--item-features", "genre"),
     "out of range for int64"),
    ("parquet-uint64-time",
     lambda t: _parquet(t, _good_table(timestamp=pa.array([1, 2**63 + 5, 1, 2], pa.uint64()))),
     "out of range for int64"),
    # --- infinite and NaN numbers ----------------------------------------------------------------
    ("csv-rating-inf", lambda t: _csv(t, HEADER + "1,10,inf,100\n"), "rating"),
    ("csv-rating-nan", lambda t: _csv(t, HEADER + "1,10,NaN,100\n"), "rating"),
    ("csv-label-nan", lambda t: _csv(t, "user_id,item_id,rating,timestamp,y\n1,10,4,100,nan\n", "--label-col", "y"),
     "column y"),
    ("csv-label-inf", lambda t: _csv(t, "user_id,item_id,rating,timestamp,y\n1,10,4,100,-inf\n", "--label-col", "y"),
     "column y"),
    ("csv-time-inf", lambda t: _csv(t, HEADER + "1,10,4,inf\n"), "column timestamp"),
    ("parquet-time-nan", lambda t: _parquet(t, _good_table(timestamp=pa.array([1.0, np.nan, 3.0, 4.0]))),
     "column timestamp"),
    ("csv-numeric-feature-inf",
     lambda t: _csv(t, "user_id,item_id,rating,timestamp,age\n1,10,4,100,inf\n2,20,5,101,3\n",
                    "--user-numeric-features", "age"), "column age: inf"),
    ("parquet-numeric-feature-nan",
     lambda t: _parquet(t, _good_table(age=pa.array([1.0, np.nan, 3.0, 4.0])), "--item-numeric-features", "age"),
     "column age: NaN"),
    ("parquet-numeric-feature-inf",
     lambda t: _parquet(t, _good_table(age=pa.array([1.0, -np.inf, 3.0, 4.0])), "--item-numeric-features", "age"),
     "column age: -inf"),
    # --- damaged files ---------------------------------------------------------------------------
    ("parquet-truncated", _truncated_parquet, "truncated or corrupt Parquet"),
    ("parquet-binary-garbage", lambda t: _parquet_garbage(t), "truncated or corrupt Parquet"),
]

# Configs: the same checks run in-process (`trec.cli.main`), which is much faster than a
# subprocess per case; the subprocess cases above cover the process-level behaviour.
CONFIG_CASES = [
    # --- YAML configs ----------------------------------------------------------------------------
    ("yaml-binary", lambda t: _yaml(t, b"\x00\xff\xfe\x89PNG\r\n\x1a\n" + bytes(range(256))), "bad.yaml"),
    ("yaml-recursive", lambda t: _yaml(t, "data: &d\n  prepare: *d\n"), "alias"),
    ("yaml-billion-laughs", _billion_laughs, "alias"),
    ("yaml-duplicate-key", lambda t: _yaml(t, "data:\n  batch_size: 8\ndata:\n  batch_size: 9\n"),
     "duplicate key 'data'"),
    ("yaml-nested-duplicate-key", lambda t: _yaml(t, "data:\n  batch_size: 8\n  batch_size: 9\n"),
     "duplicate key 'batch_size'"),
    ("yaml-env-interpolation", lambda t: _yaml(t, "data:\n  path: ${oc.env:HOME}\n"), "interpolation"),
    ("yaml-plain-interpolation", lambda t: _yaml(t, "data:\n  path: ${training.seed}\n"), "interpolation"),
    ("override-env-interpolation", _set("data.path=${oc.env:HOME}"), "interpolation"),
    ("yaml-python-tag", lambda t: _yaml(t, "data: !!python/object/apply:os.system ['touch /tmp/pwned']\n"),
     "bad.yaml"),
    ("yaml-not-a-mapping", lambda t: _yaml(t, "- 1\n- 2\n"), "mapping"),
    ("yaml-non-string-key", lambda t: _yaml(t, "data:\n  1: 2\n"), "bad.yaml"),
    # --- config values out of range ----------------------------------------------------------------
    ("batch-size-zero", _set("data.batch_size=0"), "data.batch_size"),
    ("eval-batch-size-negative", _set("data.eval_batch_size=-4"), "data.eval_batch_size"),
    ("embedding-dim-zero", _set("model.embedding_dim=0"), "model.embedding_dim"),
    ("table-dim-zero", _set("model.tables={item_id: {embedding_dim: 0}}"), "model.tables.item_id.embedding_dim"),
    ("tower-layer-zero", _set("model.two_tower.tower_layers=[64,0]"), "model.two_tower.tower_layers"),
    ("epochs-zero", _set("training.epochs=0"), "training.epochs"),
    ("max-steps-negative", _set("training.max_steps=-1"), "training.max_steps"),
    ("test-fraction-one", _set("data.prepare.test_fraction=1.0"), "data.prepare.test_fraction"),
    ("val-fraction-negative", _set("data.prepare.val_fraction=-0.1"), "data.prepare.val_fraction"),
    ("dropout-one", _set("model.two_tower.dropout=1.5"), "model.two_tower.dropout"),
    ("temperature-zero", _set("model.two_tower.temperature=0"), "model.two_tower.temperature"),
    ("lr-nan", _set("optimizer.dense_lr=.nan"), "optimizer.dense_lr"),
    ("lr-inf", _set("optimizer.sparse_lr=.inf"), "optimizer.sparse_lr"),
    ("memory-fraction", _set("sharding.memory_fraction=2"), "sharding.memory_fraction"),
    ("mix-popular", _set("model.two_tower.loss.mix_popular=1.5"), "model.two_tower.loss.mix_popular"),
    ("hard-negative-ratio", _set("model.dcn.hard_negative_ratio=-1"), "model.dcn.hard_negative_ratio"),
    ("zipf-zero", _set("data.prepare.synthetic.zipf=0"), "data.prepare.synthetic.zipf"),
    ("zipf-inf", _set("data.prepare.synthetic.zipf=.inf"), "data.prepare.synthetic.zipf"),
    ("zipf-flag-nan", lambda t: _set()(t) + ["--zipf", "nan"], "data.prepare.synthetic.zipf"),
    ("k-zero", _set("evaluation.ks=[0]"), "evaluation.ks"),
    ("ks-empty", _set("evaluation.ks=[]"), "evaluation.ks"),
    ("topics-zero", _set("data.prepare.synthetic.topics=0"), "data.prepare.synthetic.topics"),
    ("huge-override-value", _set("data.batch_size=" + "9" * 5000), "data.batch_size"),
]


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trec", *args], capture_output=True, timeout=timeout,
                          env=child_env(env), cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: str = "") -> str:
    """Exit 2 and exactly one short ``error:`` line on stderr, with no traceback."""
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{stderr[-3000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0][:500]
    assert expected in lines[0], lines[0][:500]
    assert len(lines[0]) < 600, f"error line of {len(lines[0])} characters: {lines[0][:300]}..."
    return lines[0]


@pytest.mark.parametrize("name, build, expected", CASES, ids=[case[0] for case in CASES])
def test_hostile_input_is_one_line(tmp_path, name, build, expected):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    proc = run_cli([*build(work), "--out", str(out)], cwd=REPO)
    assert_one_line_error(proc, expected)
    assert not out.exists(), "output left behind"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


@pytest.mark.parametrize("name, build, expected", CONFIG_CASES, ids=[case[0] for case in CONFIG_CASES])
def test_bad_config_is_one_line(tmp_path, capsys, monkeypatch, name, build, expected):
    from trec.cli import main

    monkeypatch.setenv("HOME", "/home/secret-home")  # what ${oc.env:HOME} would leak into a saved config
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    status = main([*build(work), "--out", str(out)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err[-3000:]
    assert expected in lines[0] and len(lines[0]) < 600, lines[0][:600]
    assert "secret-home" not in captured.err + captured.out
    assert not out.exists(), "output left behind"


# --- tampered JSON: a prepared dataset's manifest --------------------------------------------------

JSON_CASES = [
    ("json-truncated", lambda text: text[: len(text) // 2], "invalid JSON"),
    ("json-binary", lambda text: b"\x00\xff" + text.encode(), "invalid JSON"),
    ("json-deeply-nested", lambda text: "[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ("json-duplicate-key", lambda text: text.replace("{", '{"num_items": 1, ', 1), "duplicate key"),
    ("json-not-an-object", lambda text: "[1, 2, 3]", "expected a JSON object"),
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    proc = run_cli(["data", "prepare", "synthetic", "--users", "50", "--items", "20", "--interactions", "500",
                    "--out", str(out), "--quiet"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return out


@pytest.mark.parametrize("name, tamper, expected", JSON_CASES, ids=[case[0] for case in JSON_CASES])
def test_tampered_manifest_is_one_line(tmp_path, tiny_dataset, name, tamper, expected, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    manifest = data / "manifest.json"
    raw = tamper(manifest.read_text())
    manifest.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    if name == JSON_CASES[0][0]:  # one case as a real process: its exit status and all it prints
        assert_one_line_error(run_cli(["data", "info", str(data)], cwd=REPO), expected)
        return
    assert expected in refusal(capsys, "data", "info", data)  # the rest in this process


# --- output paths that cannot be written -------------------------------------------------------------

def test_out_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    proc = run_cli(["data", "prepare", "synthetic", "--users", "50", "--items", "20", "--interactions", "500",
                    "--out", str(blocker / "out")], cwd=REPO)
    assert str(blocker) in assert_one_line_error(proc)
    assert blocker.read_text() == "not a directory\n"


@pytest.fixture
def small_mount(tmp_path):
    """A mounted tmpfs (``options`` e.g. 'size=256k' or 'ro'); skipped where mounting needs privileges we lack."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_full_disk_during_prepare_is_one_line(small_mount, ml100k):
    disk = small_mount("size=256k")
    out = disk / "ml100k"
    proc = run_cli(["data", "prepare", "movielens", "--source", str(ml100k), "--out", str(out), "--quiet"], cwd=REPO)
    line = assert_one_line_error(proc, "no space left on device")
    assert str(disk) in line
    assert list(disk.iterdir()) == [], "half-written output left on the full disk"


def test_read_only_output_is_one_line(small_mount):
    disk = small_mount("ro,size=1m")
    proc = run_cli(["data", "prepare", "synthetic", "--users", "50", "--items", "20", "--interactions", "500",
                    "--out", str(disk / "out")], cwd=REPO)
    assert "read-only file system" in assert_one_line_error(proc)


# --- stdout closed early, exits at the end of a failed command --------------------------------------

def test_broken_pipe_exits_quietly():
    """`trec ... | head`: the reader goes away before trec writes; trec ends without a word on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "trec", "config", "show", "configs/movielens_two_tower.yaml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=REPO)
    proc.stdout.close()  # long before the interpreter has started: trec's first write meets a closed pipe
    stderr = proc.communicate(timeout=120)[1].decode()
    assert stderr == "", stderr
    assert proc.returncode == 141


@pytest.mark.slow
def test_failed_prepare_never_aborts(tmp_path):
    """A bad u.item stops prepare in the middle of reading it: the exit is a clean 2, every time
    (an Arrow read-ahead thread left to interpreter shutdown once made it SIGABRT now and then)."""
    source = tmp_path / "ml"
    source.mkdir()
    (source / "u.data").write_text("1\t1\t3\t881250949\n2\t2\t4\t881250950\n")
    (source / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    good = "|Movie (1995)||||0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    (source / "u.item").write_text("".join(f"{i}{good}" for i in range(1, 3000)) + "3000|Bad|row\n"
                                   + "".join(f"{i}{good}" for i in range(3001, 6000)))
    for _ in range(10):
        proc = run_cli(["data", "prepare", "movielens", "--source", str(source), "--out", str(tmp_path / "out")],
                       cwd=REPO)
        assert_one_line_error(proc, "u.item line 3000: expected 24")


# --- under torchrun --------------------------------------------------------------------------------

@pytest.mark.dist
def test_torchrun_worker_error_is_one_line(tmp_path):
    """A user error inside the workers: the line once (rank 0), quoted by the agent's summary from
    torchelastic's error file, and no Python traceback of trec."""
    not_prepared = tmp_path / "not_prepared"
    not_prepared.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trec",
               "train", "--config", "configs/movielens_two_tower.yaml", "--data", str(not_prepared),
               "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env(), cwd=REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    worker_lines = [line for line in output.splitlines() if line.startswith("[rank") and " error: " in line]
    assert len(worker_lines) == 1 and worker_lines[0].startswith("[rank0] error: "), output[-4000:]
    message = worker_lines[0].split(" error: ", 1)[1]
    assert str(not_prepared) in message
    assert f'File "{REPO / "trec"}' not in output and f'File "{REPO / "data_pipeline"}' not in output, output[-4000:]
    # The agent read the error file: its summary quotes the line instead of "To enable traceback see ...".
    summary = output[output.rfind("Root Cause"):]
    assert message in summary and "To enable traceback" not in summary, summary


def test_every_range_rule_names_a_config_field():
    """A renamed config field must not silently drop out of validation (a KeyError-free typo)."""
    from trec.config import TableConfig, TableShardingConfig, validate_config
    from trec.config.validation import _lookup, range_rules
    from trec.models import default_config

    cfg = default_config()
    cfg.model.tables = {"item_id": TableConfig(embedding_dim=8)}
    cfg.sharding.tables = {"t_item_id": TableShardingConfig(min_partition=4)}
    validate_config(cfg)
    for key, _ in range_rules(cfg):
        assert list(_lookup(cfg, key.split("."), "")), f"{key} names no config field"


def test_full_disk_during_checkpoint_is_one_line(small_mount, tiny_dataset):
    """torch's checkpoint writer hits the full disk inside DCP (a CheckpointException around a
    RuntimeError that lost the errno): still one line naming the run directory, exit 2."""
    disk = small_mount("size=96k")  # room for config.yaml and TensorBoard's first events, not a checkpoint
    proc = run_cli(["train", "--config", "configs/movielens_two_tower.yaml", "--data", str(tiny_dataset),
                    "--run-dir", str(disk / "run"), "training.max_steps=2", "data.batch_size=64",
                    "logging.projector_items=0"], cwd=REPO, timeout=600)
    stderr = proc.stderr.decode()
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert errors == [f"error: writing {disk / 'run'}: no space left on device (free some space or write elsewhere)"]
    assert not list((disk / "run" / "checkpoints").glob(".*.tmp"))  # no half-written checkpoint left behind


def test_utf8_bom_csv_is_accepted(tmp_path):
    """Excel's UTF-8 CSV starts with a byte-order mark: it is not part of the first column's name."""
    out = tmp_path / "out"
    proc = run_cli([*_csv(tmp_path, "\ufeff" + HEADER + ROWS), "--out", str(out), "--quiet"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert json.loads((out / "manifest.json").read_text())["num_interactions"] == 4


@pytest.mark.dist
def test_trec_launch_ends_in_the_one_line(tmp_path):
    """`python -m trec.launch` (torchrun's arguments): a user error in the workers is the last line,
    printed once, exit 2, and no launcher traceback."""
    not_prepared = tmp_path / "not_prepared"
    not_prepared.mkdir()
    command = [sys.executable, "-m", "trec.launch", "--standalone", "--nproc_per_node=2", "-m", "trec",
               "train", "--config", "configs/movielens_two_tower.yaml", "--data", str(not_prepared),
               "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env(), cwd=REPO)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    assert " error: " in lines[-1] and str(not_prepared) in lines[-1], lines[-1]
    assert sum(" error: " in line for line in lines) == 1, proc.stderr[-4000:]


# --- damaged files of a prepared dataset, read in-process ------------------------------------------

def _garbage(path: Path) -> None:
    path.write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite(path: Path, change) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def _nan_labels(table: pa.Table) -> pa.Table:
    return table.set_column(table.column_names.index("label"), "label",
                            pa.array(np.full(table.num_rows, np.nan, np.float32)))


def _open(data: Path) -> None:
    from trec.data import PreparedDataset

    PreparedDataset.open(data)


def _read_train(data: Path) -> None:
    from trec.data import InteractionReader, PreparedDataset

    for _ in InteractionReader(PreparedDataset.open(data), "train", 64, prefetch_batches=0):
        pass


def _lookup(data: Path) -> None:
    from trec.data import PreparedDataset

    PreparedDataset.open(data).lookup_index("user_id", 1)


# (id, file, damage, what reads it, text the one-line error must hold after the file's path)
DATASET_CASES = [
    ("items-garbage", "features/items.parquet", _garbage, _open, "truncated, corrupt or not the expected Parquet"),
    ("history-truncated", "features/user_history.parquet", _truncate, _open, "truncated, corrupt"),
    ("users-column-missing", "features/users.parquet", lambda p: _rewrite(p, lambda t: t.drop(["train_count"])),
     _open, "no column 'train_count'"),
    ("train-shard-truncated", "train/part-00000.parquet", _truncate, _read_train, "truncated, corrupt"),
    ("train-label-nan", "train/part-00000.parquet", lambda p: _rewrite(p, _nan_labels), _read_train,
     "column 'label' holds nan at row 0"),
    ("mapping-garbage", "mappings/user_id.parquet", _garbage, _lookup, "truncated, corrupt"),
]


@pytest.mark.parametrize("name, file, damage, read, expected", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_damaged_dataset_file_is_one_line(tmp_path, tiny_dataset, name, file, damage, read, expected):
    """pyarrow's errors (and a NaN label, which trained to a NaN loss) become one line naming the file."""
    from trec.errors import TrecError

    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    damage(data / file)
    with pytest.raises(TrecError) as info:
        read(data)
    message = str(info.value)
    assert message.startswith(f"{data / file}: ") and expected in message and "\n" not in message, message


def test_failed_new_run_leaves_no_run_directory(tmp_path, tiny_dataset):
    """A new run refused before its first checkpoint leaves nothing at --run-dir."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    _rewrite(data / "train/part-00000.parquet", _nan_labels)
    run_dir = tmp_path / "run"
    proc = run_cli(["train", "--config", "configs/movielens_two_tower.yaml", "--data", str(data), "--run-dir",
                    str(run_dir), "training.max_steps=2", "data.batch_size=64", "logging.projector_items=0"],
                   cwd=REPO)
    stderr = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if "error: " in line] == [
        f"error: {data / 'train/part-00000.parquet'}: column 'label' holds nan at row 0 (labels and ratings "
        "must be finite; the file does not match manifest.json)"]
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_raw_id_beyond_int64_is_unknown(tiny_dataset):
    """A --user beyond int64 is an unknown user (Arrow overflowed converting it)."""
    from trec.data import PreparedDataset
    from trec.errors import TrecError

    with pytest.raises(TrecError, match=r"user_id: unknown raw ID '18446744073709551616'"):
        PreparedDataset.open(tiny_dataset).lookup_index("user_id", str(2**64))


@pytest.mark.parametrize("args, expected", [
    (["bench", "index", "--items", "-5"], "--items must be at least 1, got -5"),
    (["bench", "index", "--queries", "0"], "--queries must be at least 1, got 0"),
    (["bench", "index", "--spread", "nan"], "--spread must be a finite number >= 0, got nan"),
])
def test_bad_bench_option_is_one_line(capsys, args, expected):
    from trec.cli import main

    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"
