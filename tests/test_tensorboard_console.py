"""What a run shows in TensorBoard and on the console: hparams through the plugin only (a short table
with the dataset's real preparation), the popularity baseline on the model's cards, test metrics at
their checkpoint's step, histograms at least once, the ranker's training-window auc/ne, plain step
lines with ETA under a pipe (a bar under a terminal), and the start and end summaries.

One short two-tower run and one short DCN run (one process each) on a small synthetic dataset.
"""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from training import run_command, trec_command

from trec.checkpoint import TrainerState
from trec.config import LoggingConfig
from trec.distributed import DistContext
from trec.logger import TrainLogger

STEPS = 12
SHORT = [f"training.max_steps={STEPS}", "training.eval_every_steps=6", "logging.log_every_steps=4",
         "logging.projector_items=0", "data.batch_size=128", "checkpoint.every_steps=0", "evaluation.ks=[10]"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "synthetic"
    run_command(trec_command(1, "data", "prepare", "synthetic", "--out", data, "--users", "200", "--items", "100",
                             "--interactions", "5000", "--val-fraction", "0.1"))
    return data


def _train(run_dir, data, config: str, *extra: str):
    return run_command(trec_command(1, "train", "--config", config, "--data", data, "--run-dir", run_dir, *SHORT,
                                    *extra), timeout=300)


@pytest.fixture(scope="module")
def two_tower(synthetic, tmp_path_factory):
    """(run dir, the finished process: stderr is a pipe, as under torchx) of a 12-step run whose
    histogram period (1000) is never reached."""
    run_dir = tmp_path_factory.mktemp("runs") / "tt"
    proc = _train(run_dir, synthetic, "configs/movielens_two_tower.yaml", "logging.histogram_every_steps=1000",
                  "model.two_tower.loss.num_negatives=64")
    return run_dir, proc


def _events(path) -> EventAccumulator:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _hparams(events: EventAccumulator) -> tuple[dict[str, object], list[str]]:
    """(the session's hparams, the experiment's metric tags) from the hparams plugin's summaries."""
    params, metrics = {}, []
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            params = {k: v.string_value if v.HasField("string_value") else v.number_value
                      for k, v in data.session_start_info.hparams.items()}
        if data.HasField("experiment"):
            metrics = [info.name.tag for info in data.experiment.metric_infos]
    return params, metrics


def _steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def test_hparams_go_through_the_plugin_only_and_name_the_real_dataset(two_tower, synthetic):
    run_dir, _ = two_tower
    tb = run_dir / "tb"
    assert sorted(p.name for p in tb.iterdir() if p.is_dir()) == ["popularity"]  # no hparams sub-run
    events = _events(tb)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("hparam/")]
    params, metrics = _hparams(events)
    assert 15 <= len(params) <= 30, sorted(params)
    manifest = json.loads((synthetic / "manifest.json").read_text())
    assert params["dataset.split"] == manifest["split"]["kind"] == "stratified"
    assert params["dataset.val_fraction"] == pytest.approx(0.1) and params["dataset.seed"] == manifest["split"]["seed"]
    assert params["dataset.id_mapping"] == "vocab" and params["dataset.users"] == 200
    assert params["model.name"] == "two_tower" and params["optimizer.decay"] == "cosine"  # a setting of the config
    assert params["training.max_steps"] == STEPS and "training.epochs" not in params  # max_steps replaces epochs
    assert not [key for key in params if key.startswith(("data.prepare.", "logging.", "checkpoint.", "sharding."))]
    # The plugin's metrics are the run's own test/ scalars (no copies).
    assert "test/ndcg@10" in metrics and set(metrics) <= set(events.Tags()["scalars"])


def test_popularity_shares_the_models_cards_and_test_metrics_sit_at_the_checkpoint_step(two_tower):
    run_dir, _ = two_tower
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model, popularity = _events(run_dir / "tb"), _events(run_dir / "tb" / "popularity")
    assert _steps(model, "val/ndcg@10") == _steps(popularity, "val/ndcg@10") == [6, 12]
    assert "test/popularity/ndcg@10" not in model.Tags()["scalars"]
    (baseline,) = popularity.Scalars("test/ndcg@10")
    assert baseline.value == pytest.approx(metrics["popularity/ndcg@10"])
    # The best checkpoint was evaluated: its step, not the last one (they are equal when the last is best).
    assert metrics["best_step"] in (6, 12)
    assert _steps(model, "test/ndcg@10") == [metrics["best_step"]] == [baseline.step]


def test_histograms_are_written_when_their_period_is_never_reached(two_tower):
    run_dir, _ = two_tower
    events = _events(run_dir / "tb")
    assert [e.step for e in events.Histograms("embedding_norm/item_norm")] == [STEPS]


def test_a_pipe_gets_step_lines_with_eta_and_the_start_and_end_summaries(two_tower):
    _, proc = two_tower
    log = proc.stderr
    assert "\r" not in log and "it/s" not in log and "step/s" not in log  # no tqdm redraws under a pipe
    lines = re.findall(r"step (\d+)/12 loss \d+\.\d+ lr .* samples/s (\d+\.\d)% ETA (\d+s|\d+m\d\ds)$", log, re.M)
    assert [(step, share) for step, share, _ in lines] == [("4", "33.3"), ("8", "66.7"), ("12", "100.0")]
    assert re.search(r"model: 6 tables \([\d,]+ parameters\), [\d,]+ dense parameters", log)
    assert re.search(r"^  item_id +101 x  64  \w+ +0$", log, re.M)  # rows x dim, sharding, ranks
    assert "table weights per rank (fp32, without optimizer state): rank 0 " in log
    end = re.search(r"trained 12 steps \(0 to 12\) in \d+s, \d+ samples/s; best val ndcg@10 \d\.\d{4} at step (\d+)",
                    log)
    assert end and log.count("trained 12 steps") == 1


def test_a_terminal_keeps_the_progress_bar(tmp_path, monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    weight = torch.nn.Parameter(torch.zeros(2))
    dense = KeyedOptimizerWrapper({"w": weight}, lambda params: torch.optim.SGD(params, lr=0.1))
    optimizer = CombinedOptimizer([("dense", dense)])
    log = TrainLogger(LoggingConfig(tensorboard=False, log_every_steps=5), tmp_path, ctx, total_steps=10,
                      samples_per_step=8, start_step=0)
    with caplog.at_level(logging.INFO, logger="trec"), log.progress(0):
        for step in range(1, 11):
            log.after_step(TrainerState(step=step), {"loss": torch.tensor(1.0)}, optimizer)
    assert "train: 100%" in terminal.getvalue() and "10/10" in terminal.getvalue()


def test_the_ranker_logs_training_window_auc_and_ne(synthetic, tmp_path):
    _train(tmp_path / "dcn", synthetic, "configs/movielens_dcn.yaml", "logging.histogram_every_steps=0",
           "model.dcn.negatives_per_positive=2")
    events = _events(tmp_path / "dcn" / "tb")
    assert _steps(events, "train/auc") == _steps(events, "train/ne") == [4, 8, 12]  # log_every_steps
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("train/auc"))
    assert all(e.value > 0.0 for e in events.Scalars("train/ne"))
    assert not events.Tags()["histograms"]  # histogram_every_steps=0 still disables them
