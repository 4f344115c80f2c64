"""A finished training run, loaded for inference: its config, dataset and sharded model.

Used by every command that reads a run (`trec evaluate`, `trec export`, `trec search`,
`trec recommend`): the run's own config.yaml says how to rebuild the model, and its best (or
newest) complete checkpoint is loaded into it, re-sharded for the current world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from trec.checkpoint import checkpoint_for_inference, load_model_weights
from trec.config import TrecConfig, load_config
from trec.data import PreparedDataset
from trec.distributed import DistContext
from trec.errors import TrecError
from trec.trainer import RunDir, build_sharded_task


@dataclass
class TrainedRun:
    run: RunDir
    cfg: TrecConfig
    dataset: PreparedDataset
    model: nn.Module
    """The DMP-wrapped task (in eval mode)."""
    task: nn.Module
    """The unwrapped task (its sharded submodules can be called directly)."""
    checkpoint: Path


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> TrecConfig:
    run = RunDir(Path(run_dir))
    if not run.config.is_file():
        raise TrecError(f"{run.config}: not found (is {run.root} a trec run directory?)")
    return load_config(run.config, overrides)


def load_trained_run(run_dir: Path, ctx: DistContext, overrides: Sequence[str] = (),
                     dataset: PreparedDataset | None = None) -> TrainedRun:
    """Rebuild the run's model on this world size and load its best (or newest) checkpoint (collective).

    ``dataset``: the run's dataset, already open (the caller has checked it is the run's).
    """
    run = RunDir(Path(run_dir))
    cfg = run_config(run.root, overrides)
    checkpoint = checkpoint_for_inference(run.root)
    dataset = dataset or PreparedDataset.open(cfg.data.path)
    model, task = build_sharded_task(cfg, dataset, ctx, train=False)
    load_model_weights(checkpoint, model)
    model.eval()
    return TrainedRun(run, cfg, dataset, model, task, checkpoint)


def two_tower_of(loaded: TrainedRun):
    """The TwoTower model of a retrieval run, or a clear error for another kind of run."""
    model = getattr(loaded.task, "model", None)
    if model is None or not hasattr(model, "item_embeddings"):
        raise TrecError(f"{loaded.run.root}: a two-tower run is needed (model.name is '{loaded.cfg.model.name}')")
    return model
