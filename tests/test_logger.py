"""trec.logger: what the loop reports, chosen by the role of a task's outputs, written by rank 0 only."""

from __future__ import annotations

import logging

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from training import scalar_steps

from trec.checkpoint import TrainerState
from trec.config import LoggingConfig, TrecConfig
from trec.distributed import DistContext
from trec.logger import TrainLogger, flat_hparams, histogram_tag


def _ctx(rank: int = 0) -> DistContext:
    return DistContext(rank, 1, rank, 1, torch.device("cpu"), "gloo")


def _optimizer(lr: float = 0.1) -> CombinedOptimizer:
    weight = torch.nn.Parameter(torch.zeros(2))
    dense = KeyedOptimizerWrapper({"w": weight}, lambda params: torch.optim.SGD(params, lr=lr))
    return CombinedOptimizer([("dense", dense)])


def _outputs(step: int) -> dict[str, torch.Tensor]:
    """A task's outputs: the loss, another 0-d scalar, an embedding norm and another 1-d tensor."""
    return {"loss": torch.tensor(1.0 / step), "click_loss": torch.tensor(2.0), "item_norm": torch.rand(8),
            "scores": torch.rand(8), "pairs": torch.rand(2, 2)}


def _train(log: TrainLogger, steps: range, optimizer) -> None:
    with log.progress(steps.start - 1):
        for step in steps:
            log.after_step(TrainerState(step=step, epoch=step // 4), _outputs(step), optimizer)


def test_outputs_are_logged_by_role_and_the_step_line_is_unchanged(tmp_path, caplog):
    cfg = LoggingConfig(log_every_steps=5, histogram_every_steps=5)
    log = TrainLogger(cfg, tmp_path, _ctx(), total_steps=12, samples_per_step=64, start_step=0)
    with caplog.at_level(logging.INFO, logger="trec"):
        _train(log, range(1, 13), _optimizer())
    log.validation({"ndcg@10": 0.5}, 10)
    log.final({"ndcg@10": 0.4, "users": 3.0, "popularity/ndcg@10": 0.1}, 12, TrecConfig())
    log.close()

    assert scalar_steps(tmp_path, "train/loss") == [5, 10, 12]  # every 5 steps, and the last one
    assert scalar_steps(tmp_path, "train/click_loss") == [5, 10, 12]  # any other 0-d output
    assert scalar_steps(tmp_path, "train/epoch") == [5, 10, 12]
    assert scalar_steps(tmp_path, "lr/dense") == [5, 10, 12]
    assert scalar_steps(tmp_path, "val/ndcg@10") == [10] and scalar_steps(tmp_path, "test/ndcg@10") == [12]
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    histograms = set(events.Tags()["histograms"])
    assert histograms == {"embedding_norm/item_norm", "train/scores"}  # 1-d outputs only
    assert [e.step for e in events.Histograms("embedding_norm/item_norm")] == [5, 10, 12]  # and the last step
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # in this run, no sub-run
    assert not (tmp_path / "hparams").exists() and scalar_steps(tmp_path / "popularity", "test/ndcg@10") == [12]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3 and lines[0].startswith("step 5/12 loss 0.2000 lr dense=1.00e-01 ")
    assert " samples/s 41.7% ETA " in lines[0] and lines[-1].endswith(" samples/s 100.0% ETA 0s")


def test_only_rank_zero_writes_and_a_resumed_start_purges_later_events(tmp_path):
    cfg = LoggingConfig(log_every_steps=5, histogram_every_steps=0)
    other = TrainLogger(cfg, tmp_path / "rank1", _ctx(rank=1), total_steps=10, samples_per_step=64, start_step=0)
    _train(other, range(1, 11), _optimizer())
    other.close()
    assert not (tmp_path / "rank1").exists()

    first = TrainLogger(cfg, tmp_path, _ctx(), total_steps=10, samples_per_step=64, start_step=0)
    _train(first, range(1, 11), _optimizer())  # logged steps 5 and 10, then "crashed" after step 10
    first.close()
    resumed = TrainLogger(cfg, tmp_path, _ctx(), total_steps=10, samples_per_step=64, start_step=5)
    _train(resumed, range(6, 11), _optimizer())
    resumed.close()
    assert scalar_steps(tmp_path, "train/loss") == [5, 10]  # step 10 once: the first attempt's was purged


def test_hparams_are_flat_dotted_keys_and_histogram_tags_group_norms():
    flat = flat_hparams(TrecConfig())
    assert "optimizer.dense_lr" in flat and "training.seed" in flat and "data.batch_size" in flat
    assert not any(key.startswith(("logging.", "checkpoint.")) for key in flat)
    assert histogram_tag("user_norm") == "embedding_norm/user_norm" and histogram_tag("scores") == "train/scores"
