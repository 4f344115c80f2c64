"""End-to-end training on MovieLens 100K with 2 gloo ranks: run directory, resume, resharding.

The uninterrupted 2-rank run and the killed-then-resumed one are session fixtures (conftest),
shared with the export tests. Training is deterministic on CPU, so a resumed run must end with
bit-identical weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training import STEPS, model_weights, resumed_step, run_command, scalar_steps, train_command

from trec.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_run_directory_has_config_checkpoints_metrics_and_tensorboard(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = (full_run / "config.yaml").read_text()
    assert "name: two_tower" in config and "max_steps: 40" in config

    metrics = json.loads((full_run / "metrics.json").read_text())
    for k in (10, 20):
        for name in ("precision", "recall", "ndcg", "map", "mrr", "hit", "coverage", "diversity"):
            assert 0.0 <= metrics[f"{name}@{k}"] <= 1.0, (name, k)
            assert f"popularity/{name}@{k}" in metrics
    assert metrics["step"] == STEPS
    assert metrics["users"] == 943  # every ML-100K user has test items under the 0.25 split
    assert metrics["ndcg@10"] > metrics["popularity/ndcg@10"]  # it learned more than popularity

    checkpoints = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert checkpoints == ["best", "step-35", "step-40"]  # keep_last=2, plus the best one
    state = json.loads((full_run / "checkpoints" / "step-40" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["samples"] == STEPS * 512 * 2 and state["world_size"] == 2

    tb = full_run / "tb"
    assert scalar_steps(tb, "train/loss") == list(range(5, STEPS + 1, 5))
    assert scalar_steps(tb, "val/ndcg@10") == [20, 40]
    assert scalar_steps(tb, "test/ndcg@10") == [metrics["best_step"]]  # the step of the checkpoint evaluated
    assert scalar_steps(tb / "popularity", "val/ndcg@10") == [20, 40]  # the baseline, on the model's cards
    events = EventAccumulator(str(tb), size_guidance={"histograms": 0})
    events.Reload()
    assert "lr/sparse" in events.Tags()["scalars"] and "lr/dense" in events.Tags()["scalars"]
    assert "embedding_norm/item_norm" in events.Tags()["histograms"]
    assert (tb / "projector_config.pbtxt").is_file()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # in the run, no sub-run


def test_resume_after_kill_reaches_same_step_with_identical_weights(full_run, resumed_run):
    run_dir, interrupted_at, log = resumed_run
    assert interrupted_at.name != f"step-{STEPS}", "the kill came too late"
    assert resumed_step(log, run_dir) == int(interrupted_at.name.removeprefix("step-"))  # that checkpoint, by name
    final, reference = run_dir / "checkpoints" / f"step-{STEPS}", full_run / "checkpoints" / f"step-{STEPS}"
    assert json.loads((final / "trainer_state.json").read_text()) == json.loads(
        (reference / "trainer_state.json").read_text()
    )
    ours, theirs = model_weights(final), model_weights(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:  # any repeated or skipped batch would change the weights
        assert torch.equal(ours[key], theirs[key]), key
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, full_run))
    assert metrics["ndcg@10"] == expected["ndcg@10"]
    # TensorBoard drops what the killed attempt logged after the checkpoint: each step once.
    assert scalar_steps(run_dir / "tb", "train/loss") == list(range(5, STEPS + 1, 5))


def test_two_rank_checkpoint_evaluates_identically_on_one_rank(full_run, run_trec, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(full_run, run_dir)
    expected = json.loads((full_run / "metrics.json").read_text())
    run_trec("evaluate", "--run-dir", run_dir)  # one process: DCP re-shards the 2-rank checkpoint
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("ndcg@10", "recall@20", "map@10", "coverage@10", "diversity@10"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key


def test_two_rank_checkpoint_resumes_training_on_one_rank(full_run, ml100k_prepared, tmp_path):
    run_dir = tmp_path / "one_rank"
    shutil.copytree(full_run, run_dir)
    proc = run_command(train_command(run_dir, ml100k_prepared, "training.max_steps=45", nproc=1), timeout=600)
    assert "resuming a 2-rank checkpoint on 1 ranks" in proc.stderr
    state = json.loads((run_dir / "checkpoints" / "step-45" / "trainer_state.json").read_text())
    assert state["step"] == 45 and state["world_size"] == 1


def test_half_written_checkpoints_are_never_picked(full_run, ml100k_prepared, tmp_path):
    run_dir = tmp_path / "half"
    shutil.copytree(full_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    # A save interrupted before its rename, and one under its final name without DCP metadata.
    shutil.copytree(checkpoints / "step-40", checkpoints / ".step-45.tmp")
    shutil.copytree(checkpoints / "step-40", checkpoints / "step-50")
    (checkpoints / "step-50" / ".metadata").unlink()
    assert latest_checkpoint(checkpoints).name == "step-40"

    proc = run_command(train_command(run_dir, ml100k_prepared, "training.max_steps=45"), timeout=600)
    assert f"resumed from {checkpoints / 'step-40'}" in proc.stderr
    assert not (checkpoints / ".step-45.tmp").exists()  # the interrupted save was cleaned up
    assert latest_checkpoint(checkpoints).name == "step-45"


@pytest.mark.parametrize("overrides", [
    ["model.two_tower.loss.negatives=hard", "model.two_tower.loss.num_hard_negatives=8"],
    ["model.two_tower.loss.negatives=mixed"],
    ["model.two_tower.loss.negatives=popular"],
    ["model.two_tower.loss.negatives=none"],
    ["model.two_tower.loss.kind=bce", "model.two_tower.learn_temperature=true"],
    ["training.pipeline=plain"],
], ids=["hard", "mixed", "popular", "in-batch", "bce", "plain-pipeline"])
def test_every_loss_and_negative_strategy_trains(ml100k_prepared, tmp_path, overrides):
    run_dir = tmp_path / "run"
    run_command(train_command(run_dir, ml100k_prepared, "training.max_steps=6", "checkpoint.every_steps=0",
                              "evaluation.max_users=50", "logging.projector_items=0", *overrides, nproc=1),
                timeout=600)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6 and 0.0 <= metrics["ndcg@10"] <= 1.0
