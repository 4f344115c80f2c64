"""Runs, datasets and indexes are bound: a run records the fingerprint of the dataset it trained on
(RUN/run.json), an export records its run, checkpoint and dataset, and every command refuses, in one
line, a dataset or an index that is not the run's.

Real one-process runs of a few steps on ML-100K (tests/training.py: tiny_train_command).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from training import refusal, run_command, tiny_train_command, trec_command

from trec.data import PreparedDataset
from trec.distributed import DistContext
from trec.errors import TrecError
from trec.runs import dataset_fingerprint, short

pytestmark = [pytest.mark.slow]


def trec(*args, check: bool = True):
    return run_command(trec_command(1, *args), check, timeout=600)


def prepare(ml100k: Path, out: Path, seed: int, *extra: str) -> None:
    trec("data", "prepare", "movielens", "--source", ml100k, "--out", out, "--split", "stratified",
         "--test-fraction", "0.25", "--val-fraction", "0.1", "--seed", str(seed), "--quiet", *extra)


def test_fingerprint_changes_with_the_split_and_not_with_the_path(ml100k, ml100k_prepared, tmp_path):
    ours = dataset_fingerprint(PreparedDataset.open(ml100k_prepared))
    shutil.copytree(ml100k_prepared, tmp_path / "copy")
    prepare(ml100k, tmp_path / "again", 42)  # an identical re-prepare, elsewhere
    prepare(ml100k, tmp_path / "seed7", 7)
    assert dataset_fingerprint(PreparedDataset.open(tmp_path / "copy")) == ours
    assert dataset_fingerprint(PreparedDataset.open(tmp_path / "again")) == ours
    assert dataset_fingerprint(PreparedDataset.open(tmp_path / "seed7")) != ours


def test_a_dataset_prepared_again_with_another_seed_is_refused_everywhere(ml100k, ml100k_prepared, tmp_path, capsys):
    data, run_dir, export = tmp_path / "data", tmp_path / "run", tmp_path / "export"
    shutil.copytree(ml100k_prepared, data)
    run_command(tiny_train_command(run_dir, data, 2))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["dataset"]["fingerprint"] == dataset_fingerprint(PreparedDataset.open(data))
    trec("export", "--run-dir", run_dir, "--out", export)

    prepare(ml100k, data, 7, "--overwrite")  # the same name, another split: test items now sit in train
    bound, now = short(record["dataset"]["fingerprint"]), short(dataset_fingerprint(PreparedDataset.open(data)))
    assert bound != now
    commands = {
        "evaluate": ["evaluate", "--run-dir", run_dir],
        "export": ["export", "--run-dir", run_dir, "--out", tmp_path / "export2"],
        "search": ["search", "--index", export, "--run-dir", run_dir, "--user", "1"],
        "recommend": ["recommend", "--run-dir", run_dir, "--user", "1"],
        "train": tiny_train_command(run_dir, data, 4)[3:],  # resuming it on the new split (after "python -m trec")
    }
    for name, args in commands.items():
        line = refusal(capsys, *args)
        assert f"fingerprint {bound}" in line and f"fingerprint {now}" in line and str(data) in line, (name, line)
    assert not (tmp_path / "export2").exists()

    # Two-stage loads both runs onto one dataset: the same refusal, before any model is built.
    from trec.two_stage import load_run

    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(TrecError, match=f"fingerprint {bound}.*fingerprint {now}"):
        load_run(run_dir, PreparedDataset.open(data), ctx)


def test_an_index_of_another_run_or_checkpoint_is_refused(ml100k_prepared, tmp_path, capsys):
    run_a, run_b, export = tmp_path / "a", tmp_path / "b", tmp_path / "export"
    run_command(tiny_train_command(run_a, ml100k_prepared, 2))
    trec("export", "--run-dir", run_a, "--out", export)
    source = json.loads((export / "manifest.json").read_text())["source"]
    record = json.loads((run_a / "run.json").read_text())
    assert source["run_id"] == record["run_id"] and source["dataset_fingerprint"] == record["dataset"]["fingerprint"]
    assert (source["checkpoint_name"], source["step"]) == ("step-2", 2)

    # Another run on the same dataset: its user tower does not match these item vectors.
    run_command(tiny_train_command(run_b, ml100k_prepared, 2))
    other = json.loads((run_b / "run.json").read_text())["run_id"]
    for args in (["search", "--index", export, "--run-dir", run_b, "--user", "1"],
                 ["evaluate", "--run-dir", run_b, "--index", export]):
        line = refusal(capsys, *args)
        assert f"ID {short(record['run_id'])}" in line and f"ID {short(other)}" in line and str(run_b) in line

    # The same run, trained further: the index holds the vectors of an older checkpoint.
    shutil.copytree(run_a, tmp_path / "a2")
    run_command(tiny_train_command(tmp_path / "a2", ml100k_prepared, 4))
    line = refusal(capsys, "search", "--index", export, "--run-dir", tmp_path / "a2", "--user", "1")
    assert "checkpoint step-2 at step 2" in line and "step-4 at step 4" in line

    # Two-stage retrieval through the index checks the retriever the same way.
    from trec.distributed import distributed_session
    from trec.export import ShardedIndex
    from trec.runs import load_trained_run
    from trec.two_stage import retrieval_candidates

    with distributed_session(0, "cpu", "WARNING") as ctx:
        retriever = load_trained_run(run_b, ctx)
        with pytest.raises(TrecError, match=re.escape(f"not from {run_b}")):
            retrieval_candidates(retriever, retriever.dataset, ["train"], ctx, ShardedIndex.load(export))


def test_an_index_of_another_legacy_run_is_refused(tmp_path):
    """Runs made before run.json have no run ID: an export of one must not pass for another on the same
    dataset and checkpoint name/step (None == None), the run directory tells them apart. Stub run and
    index: only the recorded binding is compared."""
    from types import SimpleNamespace

    from trec.runs import check_index_binding

    def legacy_run(root: Path):
        binding = {"run_id": None, "run_dir": str(root.resolve()), "checkpoint_name": "step-2", "step": 2,
                   "dataset_fingerprint": "f" * 64}
        return SimpleNamespace(run=SimpleNamespace(root=root), binding=lambda: binding,
                               dataset=SimpleNamespace(path=tmp_path / "data", num_items=10))

    run_a, run_b = legacy_run(tmp_path / "a"), legacy_run(tmp_path / "b")
    checked = []
    index = SimpleNamespace(root=tmp_path / "export", manifest={"source": run_a.binding()},
                            check_catalog=lambda num_items, where: checked.append(num_items))
    check_index_binding(index, run_a)  # its own run
    assert checked == [10]
    with pytest.raises(TrecError, match=re.escape(f"not from {tmp_path / 'b'}")):
        check_index_binding(index, run_b)
