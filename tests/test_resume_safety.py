"""Resuming never damages a run: an incompatible start is refused before anything is written, and a
finished run (final step reached, or early-stopped) trains nothing when started again.

Real one-process runs of a few steps on ML-100K (tests/training.py: tiny_train_command).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from training import error_line, run_command, tiny_train_command

pytestmark = [pytest.mark.slow]


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of the run (relative path → (mtime_ns, bytes)); TensorBoard events by mtime only."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files[path.relative_to(run_dir).as_posix()] = (stat.st_mtime_ns, path.read_bytes())
    return files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ml100k_prepared) -> Path:
    """A run trained to its final step (4), with its final evaluation."""
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    run_command(tiny_train_command(run_dir, ml100k_prepared, 4))
    return run_dir


def test_a_finished_run_trains_nothing_and_keeps_its_files(finished_run, ml100k_prepared, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)
    proc = run_command(tiny_train_command(run_dir, ml100k_prepared, 4))  # what a second `make quickstart` does
    assert "run already finished at step 4 (final step 4 reached); nothing to train" in proc.stdout
    assert "training:" not in proc.stderr and "checkpoint: saved" not in proc.stderr
    assert snapshot(run_dir) == before  # no checkpoint, metrics.json, config.yaml or event file rewritten


def test_an_early_stopped_run_is_finished(ml100k_prepared, tmp_path):
    run_dir = tmp_path / "run"
    # "users" (the number of validation users evaluated) never improves: the second validation stops
    # training, whatever the CPU computes.
    early = ["training.eval_every_steps=2", "training.early_stopping_metric=users",
             "training.early_stopping_patience=1"]
    first = run_command(tiny_train_command(run_dir, ml100k_prepared, 40, *early))
    assert "early stopping at step 4" in first.stderr
    state = json.loads((run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["early_stopped"] is True and state["step"] == 4
    before = snapshot(run_dir)

    again = run_command(tiny_train_command(run_dir, ml100k_prepared, 40, *early))
    assert "run already finished at step 4 (early-stopped at step 4); nothing to train" in again.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "step-4"]
    assert snapshot(run_dir) == before


def test_a_start_that_changes_shapes_or_semantics_is_refused_before_anything_is_written(finished_run, ml100k_prepared,
                                                                                        tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)

    proc = run_command(tiny_train_command(run_dir, ml100k_prepared, 6, "model.embedding_dim=32",
                                          "optimizer.dense_lr=0.01", "logging.log_every_steps=1"), check=False)
    line = error_line(proc)
    assert "model.embedding_dim 64 -> 32" in line and "optimizer.dense_lr 0.001 -> 0.01" in line
    assert "logging" not in line  # harmless keys are not named
    assert snapshot(run_dir) == before

    # A start that fails later (its dataset is missing) leaves config.yaml as it was, too.
    missing = tmp_path / "no-such-dataset"
    proc = run_command(tiny_train_command(run_dir, missing, 6), check=False)
    assert str(missing) in error_line(proc)
    assert snapshot(run_dir) == before

    # Extending the run, with other logging, is a legitimate resume: it trains steps 5 and 6 only.
    proc = run_command(tiny_train_command(run_dir, ml100k_prepared, 6, "logging.log_every_steps=1"))
    assert f"resumed from {run_dir / 'checkpoints' / 'step-4'}" in proc.stderr
    assert "starting at step 4" in proc.stderr
    assert "max_steps: 6" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 6


def test_a_resume_may_not_change_what_the_best_metric_means(tmp_path):
    """evaluation.gain and evaluation.exclude_train change the value of the metric that picks best/
    (and early stopping): the resumed run would compare graded against binary NDCG. In-process, no run."""
    from trec.config import save_config
    from trec.models import default_config
    from trec.errors import TrecError
    from trec.runs import RunDir, check_resumable_config

    run = RunDir(tmp_path)
    saved = default_config()
    save_config(saved, run.config)
    for key, value in (("gain", "graded"), ("exclude_train", False)):
        changed = default_config()
        setattr(changed.evaluation, key, value)
        with pytest.raises(TrecError, match=f"evaluation.{key}"):
            check_resumable_config(changed, run)
    harmless = default_config()
    harmless.evaluation.max_users, harmless.evaluation.popularity_baseline = 100, False
    check_resumable_config(harmless, run)
