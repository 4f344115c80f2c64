"""``training.validation: auto``: where the number of steps is chosen when a dataset has no val split.

The trainer (:func:`trec.trainer.select_steps`) early-stops a run on a validation split carved
from train (:mod:`trec.data.carve`), then refits on the whole train split for the chosen steps.
This module holds what that leaves in the run directory::

    RUN/validation/data/            the carved dataset (bound to the user's by its fingerprint)
    RUN/validation/run/             the run that early-stops on it (checkpoints, TensorBoard)
    RUN/validation/selection.json   the choice (:class:`StepSelection`), reused by a restart
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from trec.checkpoint import latest_checkpoint
from trec.config import TrecConfig, Validation
from trec.data import PreparedDataset, read_manifest
from trec.data.carve import carve_validation, carved_matches
from trec.distributed import DistContext, barrier
from trec.errors import TrecError
from trec.io import atomic_write_json, read_json_object
from trec.runs import RunDir, short

logger = logging.getLogger("trec")

AUTO_VALIDATION = "validation"


@dataclass
class StepSelection:
    """What ``training.validation: auto`` chose (RUN/validation/selection.json)."""

    dataset_fingerprint: str
    metric: str
    value: float
    """The best validation value, at ``best_step`` of the run on the carved split."""
    best_step: int
    carved_train_rows: int
    val_rows: int
    train_rows: int
    refit_steps: int
    """``best_step`` × train_rows / carved_train_rows: as many epochs over the whole train split."""

    def metrics(self) -> dict[str, float]:
        return {f"val/{self.metric}": self.value, "auto_validation/best_step": self.best_step,
                "auto_validation/refit_steps": self.refit_steps, "auto_validation/val_rows": self.val_rows}


def validation_root(run_dir: Path) -> Path:
    return Path(run_dir) / AUTO_VALIDATION


def needs_carved_validation(cfg: TrecConfig) -> bool:
    """``validation: auto`` with early stopping on a dataset without a val split."""
    if cfg.training.validation != Validation.auto or not cfg.training.early_stopping_metric:
        return False
    return not any(name.startswith("val/") for name in read_manifest(Path(cfg.data.path))["files"])


def chosen_steps(run_dir: Path, fingerprint: str, dataset: PreparedDataset) -> StepSelection | None:
    """The choice an earlier start made for this dataset, or None; refuses one made for another dataset."""
    path = validation_root(run_dir) / "selection.json"
    if not path.is_file():
        return None
    selection = StepSelection(**read_json_object(path))
    _check_dataset(selection.dataset_fingerprint, fingerprint, run_dir, dataset)
    return selection


def carved_split(cfg: TrecConfig, run_dir: Path, fingerprint: str, dataset: PreparedDataset,
                 ctx: DistContext) -> Path:
    """RUN/validation/data: carved on rank 0 unless the right carve is there (collective)."""
    root = validation_root(run_dir)
    carved, fraction, seed = root / "data", cfg.training.validation_fraction, cfg.training.seed
    matches = carved_matches(carved, fingerprint, fraction, seed)
    if not matches and latest_checkpoint(RunDir(root / "run").checkpoints) is not None:
        _check_dataset("", fingerprint, run_dir, dataset)  # its choosing run trained on another carve
    if ctx.is_main and not matches:
        logger.info("training.validation=auto: %s has no val split; carving %.0f%% of each user's train rows "
                    "into %s", dataset.path, 100 * fraction, carved)
        carve_validation(dataset, fingerprint, carved, fraction, seed)
    barrier()
    return carved


def record_choice(run_dir: Path, selection: StepSelection, ctx: DistContext) -> None:
    logger.info("training.validation=auto: best %s %.4f at step %d on the carved split; refitting on the whole "
                "train split for %d steps", selection.metric, selection.value, selection.best_step,
                selection.refit_steps)
    if ctx.is_main:
        atomic_write_json(validation_root(run_dir) / "selection.json", asdict(selection))
    barrier()


def has_progress(run_dir: Path) -> bool:
    """True once the choosing run has a checkpoint (a failed start must not delete it)."""
    return latest_checkpoint(RunDir(validation_root(run_dir) / "run").checkpoints) is not None


def _check_dataset(bound: str, now: str, run_dir: Path, dataset: PreparedDataset) -> None:
    if bound != now:
        raise TrecError(f"{run_dir}: its training.validation=auto steps were chosen on another dataset than "
                        f"{dataset.path} (fingerprint {short(now)}); train a new run on this one")
