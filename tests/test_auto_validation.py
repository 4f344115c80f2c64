"""training.validation: auto — a validation split carved from train (history and counts rebuilt without it),
early stopping on it, and the refit on the whole train split for the chosen steps (a real 2-rank run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import layout as L
from tests.training import run_command, scalar_steps, trec_command
from trec.data import PreparedDataset
from trec.data.carve import carve_validation, carved_matches
from trec.runs import dataset_fingerprint

FRACTION, SEED = 0.1, 42


@pytest.fixture(scope="module")
def no_val(ml100k, tmp_path_factory):
    """ML-100K with the benchmark protocol and no val split: what `trec bench quality` trains on."""
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.movielens import MovieLensSource
    from trec.config import PrepareConfig

    out = tmp_path_factory.mktemp("noval") / "ml100k"
    prepare_dataset(MovieLensSource(str(ml100k)), out, PrepareConfig(test_fraction=0.25, seed=42, history_max_len=50))
    return out


@pytest.fixture(scope="module")
def carved(no_val, tmp_path_factory):
    dataset = PreparedDataset.open(no_val)
    out = tmp_path_factory.mktemp("carved") / "data"
    carve_validation(dataset, dataset_fingerprint(dataset), out, FRACTION, SEED)
    return dataset, PreparedDataset.open(out, verify=True)


def _rows(dataset: PreparedDataset, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in dataset.split_files(split)])


def _keys(table: pa.Table) -> np.ndarray:
    users, items = table[L.USER_ID].to_numpy(), table[L.ITEM_ID].to_numpy()
    return np.sort(users * 10_000_000 + items * 10 + (table[L.TIMESTAMP].to_numpy() % 10))


def test_carve_moves_a_share_of_each_users_train_rows_to_val(carved):
    source, derived = carved
    train, new_train, val = _rows(source, "train"), _rows(derived, "train"), _rows(derived, "val")
    assert new_train.num_rows + val.num_rows == train.num_rows
    assert np.array_equal(_keys(pa.concat_tables([new_train, val])), _keys(train))  # the same rows, split
    n = np.bincount(train[L.USER_ID].to_numpy(), minlength=source.num_users)
    expected = np.clip(np.round(n * FRACTION), 0, np.maximum(n - 1, 0))
    assert np.array_equal(np.bincount(val[L.USER_ID].to_numpy(), minlength=source.num_users), expected)
    assert derived.manifest["counts"] == {"train": new_train.num_rows, "val": val.num_rows,
                                          "test": source.num_rows("test")}
    # The test shards are the source's own files (hard links), not copies.
    assert [os.path.samefile(a, b) for a, b in zip(source.split_files("test"), derived.split_files("test"))] == [True]


def test_carve_rebuilds_history_and_counts_without_the_val_rows(carved):
    source, derived = carved
    new_train, val = _rows(derived, "train"), _rows(derived, "val")
    users, items = new_train[L.USER_ID].to_numpy(), new_train[L.ITEM_ID].to_numpy()
    assert np.array_equal(derived.user_counts, np.bincount(users, minlength=source.num_users))
    assert np.array_equal(derived.item_train_rows, np.bincount(items, minlength=source.num_items))
    history = pq.read_table(derived.path / L.HISTORY_FILE)["history"].to_pylist()
    liked = new_train[L.LABEL].to_numpy() >= 0.5
    times, val_users = new_train[L.TIMESTAMP].to_numpy(), val[L.USER_ID].to_numpy()
    val_only = 0
    for user in range(0, source.num_users, 37):
        mine = np.flatnonzero(liked & (users == user))
        newest = items[mine[np.argsort(times[mine], kind="stable")]][-50:]
        assert history[user] == newest.tolist(), user
        val_only += len(set(val[L.ITEM_ID].to_numpy()[val_users == user].tolist()) & set(history[user]))
    assert val_only == 0  # a carved item never reaches the history the model reads
    before = pq.read_table(source.path / L.HISTORY_FILE)["history"].to_pylist()
    assert sum(map(len, history)) < sum(map(len, before))


def test_carve_is_bound_to_its_dataset_and_reused(carved, no_val):
    source, derived = carved
    fingerprint = dataset_fingerprint(source)
    assert derived.manifest["derived_from"] == {"dataset_fingerprint": fingerprint, "val_fraction": FRACTION,
                                                "seed": SEED}
    assert dataset_fingerprint(derived) != fingerprint
    assert carved_matches(derived.path, fingerprint, FRACTION, SEED)
    assert not carved_matches(derived.path, fingerprint, 0.2, SEED)
    assert not carved_matches(derived.path, "0" * 64, FRACTION, SEED)


@pytest.mark.slow
def test_auto_validation_chooses_steps_then_refits_on_two_ranks(no_val, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/movielens_two_tower.yaml", "--data", no_val, "--run-dir", run_dir,
            "training.max_steps=80", "training.eval_every_steps=20", "training.early_stopping_patience=1",
            "checkpoint.every_steps=0", "logging.projector_items=0", "data.batch_size=512"]
    run_command(trec_command(2, *args), timeout=600)
    selection = json.loads((run_dir / "validation/selection.json").read_text())
    val_rows = PreparedDataset.open(run_dir / "validation/data").num_rows("val")
    train_rows = PreparedDataset.open(no_val).num_rows("train")
    assert selection["val_rows"] == val_rows and selection["train_rows"] == train_rows
    assert selection["best_step"] in (20, 40, 60, 80)
    assert selection["refit_steps"] == round(selection["best_step"] * train_rows / (train_rows - val_rows))
    # The choosing run validated on the carved split; the refit trained exactly the chosen steps, no validation.
    assert scalar_steps(run_dir / "validation/run/tb", "val/ndcg@10")[0] == 20
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == selection["refit_steps"]
    assert metrics["auto_validation/best_step"] == selection["best_step"]
    assert metrics["val/ndcg@10"] == pytest.approx(selection["value"])
    assert scalar_steps(run_dir / "tb", "auto_validation/refit_steps") == [metrics["step"]]
    assert not (run_dir / "checkpoints" / "best").exists()
    # Started again: nothing is chosen or trained again.
    again = run_command(trec_command(1, *args), timeout=600)
    assert "nothing to train" in again.stderr and "carving" not in again.stderr
    # Another dataset (here the same one with another seed in its manifest) cannot reuse the choice.
    other = Path(shutil.copytree(no_val, tmp_path / "other"))
    manifest = json.loads((other / L.MANIFEST).read_text())
    (other / L.MANIFEST).write_text(json.dumps(manifest | {"seed": 7}))
    proc = run_command(trec_command(1, *(other if a == no_val else a for a in args)), check=False, timeout=300)
    assert proc.returncode == 2 and "steps were chosen on another dataset" in proc.stderr.splitlines()[-1]


def test_validation_split_trains_every_step_without_carving(no_val, tmp_path):
    run_dir = tmp_path / "run"
    run_command(trec_command(1, "train", "--config", "configs/movielens_two_tower.yaml", "--data", no_val,
                             "--run-dir", run_dir, "training.validation=split", "training.max_steps=6",
                             "checkpoint.every_steps=0", "logging.tensorboard=false"), timeout=600)
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 6
    assert not (run_dir / "validation").exists()
