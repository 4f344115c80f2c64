"""The one training loop, for every trec model.

    trainer = Trainer.build(cfg, run_dir, ctx)
    trainer.fit()            # resumes from RUN/checkpoints if a complete checkpoint exists
    trainer.final_evaluation(started)

A model only contributes its task (``forward(batch) -> (loss, outputs)``, an optional reader
hook for negatives) and its evaluation, via :mod:`trec.models`. The loop owns the pipeline
(torchrec's ``TrainPipelineSparseDist`` or ``TrainPipelineBase``), periodic validation with
early stopping and best-model tracking, and checkpoints; what it reports is
:class:`~trec.logger.TrainLogger`'s. Resuming never damages a run (:mod:`trec.runs` checks the
config and dataset before anything is written; config.yaml and run.json are written once the
checkpoint is loaded), a finished run trains nothing, and SIGTERM stops training at the next
step boundary with a checkpoint (:class:`~trec.preemption.StopSignal`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from trec.checkpoint import (BEST, Checkpointer, TrainerState, is_complete, latest_checkpoint, load_model_weights,
                             read_trainer_state)
from trec.config import PipelineKind, TrainingConfig, TrecConfig
from trec.data import InteractionReader, PreparedDataset, RecBatch
from trec.distributed import DistContext, barrier
from trec.errors import TrecError
from trec.evaluation.protocol import check_cutoffs, evaluation_splits
from trec.io import atomic_write_json
from trec.logger import TrainLogger
from trec.models import EvaluationRequest, ModelSpec, SetupContext, model_spec, retriever_of
from trec.optim import build_optimizer
from trec.preemption import StopSignal
from trec.runs import (RunDir, build_sharded_task, check_resumable_config, check_run_dataset, dataset_fingerprint,
                       final_metrics, finished_reason, read_run_record, record_run, resumable_state, retriever_run)
from trec.selection import (StepSelection, carved_split, chosen_steps, has_progress, needs_carved_validation,
                            record_choice, validation_root)

logger = logging.getLogger("trec")


def total_training_steps(training: TrainingConfig, steps_per_epoch: int, selection: StepSelection | None = None) -> int:
    """The length of the learning-rate schedule. A refit (``selection``) keeps the schedule of the run
    that chose its steps, scaled to the whole train split: its epochs, or its max_steps × the size ratio."""
    if training.max_steps and selection is not None:
        return round(training.max_steps * selection.train_rows / selection.carved_train_rows)
    return training.max_steps or training.epochs * steps_per_epoch


def build_reader(cfg: TrecConfig, dataset: PreparedDataset, ctx: DistContext, task) -> InteractionReader:
    """This rank's share of the train split, in the task's batches (its ``augment`` hook, if any)."""
    reader = InteractionReader(dataset, "train", batch_size=cfg.data.batch_size, rank=ctx.rank,
                               world_size=ctx.world_size, seed=cfg.training.seed, shuffle=cfg.data.shuffle,
                               prefetch_batches=cfg.data.prefetch_batches, history_max_len=cfg.data.history_max_len,
                               exclude_target_from_history=True, augment=getattr(task, "augment", None))
    if len(reader) == 0:
        raise TrecError(
            f"{cfg.data.path}: the train split has fewer rows per rank than data.batch_size={cfg.data.batch_size}")
    return reader


def build_pipeline(kind: PipelineKind, model, optimizer, ctx: DistContext):
    """torchrec's ``TrainPipelineSparseDist`` (input dist overlapped with compute) or plain ``TrainPipelineBase``."""
    from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

    if kind == PipelineKind.sparse_dist:
        return TrainPipelineSparseDist(model, optimizer, ctx.device)
    return TrainPipelineBase(model, optimizer, ctx.device)


class Trainer:
    """Runs ``fit`` for one task; build it with :meth:`Trainer.build`."""

    def __init__(self, cfg: TrecConfig, run: RunDir, ctx: DistContext, dataset: PreparedDataset, spec: ModelSpec,
                 model, task, reader: InteractionReader, optimizer, record: dict | None,
                 selection: StepSelection | None = None) -> None:
        self.cfg, self.run, self.ctx, self.dataset, self.spec = cfg, run, ctx, dataset, spec
        self.model, self.task, self.reader, self.optimizer = model, task, reader, optimizer
        self.checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint, ctx)
        self.steps_per_epoch = len(reader)
        self.selection = selection
        self.total_steps = total_training_steps(cfg.training, self.steps_per_epoch, selection)
        if selection is not None:  # stops at the chosen step, in the middle of the schedule it was chosen in
            self.total_steps = min(self.total_steps, selection.refit_steps)
        self.metric = cfg.training.early_stopping_metric or spec.default_metric
        self.validation_split, self.test_exclusions = evaluation_splits(dataset)
        self.state = TrainerState(world_size=ctx.world_size, dataset_fingerprint=dataset_fingerprint(dataset))
        self.record = record  # RUN/run.json as it was when the trainer was built (None: not written yet)
        self.stopped_by: str | None = None  # the signal that stopped fit() early (a checkpoint was saved)
        self._saved_step: int | None = None
        self._detached = False  # evaluate() detached the pipeline: re-attach before the next step
        self.log: TrainLogger | None = None
        self.pipeline = None

    @classmethod
    def build(cls, cfg: TrecConfig, run_dir: Path, ctx: DistContext,
              selection: StepSelection | None = None) -> "Trainer":
        """Check that ``cfg`` and its dataset may (re)start the run, then build everything (collective).

        A run with a complete checkpoint is refused a config that changes its shapes or meaning and
        a dataset other than its own, before anything is written. Only the run's directory (and a
        model's setup cache, e.g. mined hard negatives) is written here; :meth:`fit` writes the rest."""
        run = RunDir(Path(run_dir))
        trained = latest_checkpoint(run.checkpoints) is not None
        if trained:
            check_resumable_config(cfg, run)
        dataset = PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
        check_cutoffs(cfg.evaluation.ks, dataset)  # before training, not at its final evaluation
        # A run with nothing trained has nothing to protect: a new start may bind it to another dataset.
        record = check_run_dataset(run, dataset) if trained else read_run_record(run)
        if ctx.is_main:
            run.root.mkdir(parents=True, exist_ok=True)
        spec = model_spec(cfg.model.name)
        model, task = build_sharded_task(cfg, dataset, ctx, train=True)
        if spec.setup is not None:
            spec.setup(task, SetupContext(dataset, ctx, run.root, lambda path, data: retriever_run(path, data, ctx)))
        reader = build_reader(cfg, dataset, ctx, task)
        optimizer = build_optimizer(model, cfg.optimizer, total_training_steps(cfg.training, len(reader), selection))
        return cls(cfg, run, ctx, dataset, spec, model, task, reader, optimizer, record, selection)

    def fit(self) -> TrainerState:
        """Train from the newest complete checkpoint (or from scratch) to ``total_steps``; stops early on
        early stopping, or after SIGTERM (:attr:`stopped_by`); the last step trained is checkpointed."""
        self._resume()
        if self.ctx.is_main:  # config.yaml and run.json, now that the model is built and any checkpoint loaded
            self.record = record_run(self.run, self.cfg, self.dataset, self.record, self.state.step)
        self.log = TrainLogger(self.cfg.logging, self.run.tensorboard, self.ctx, self.total_steps,
                               self.cfg.data.batch_size * self.ctx.world_size, self.state.step)
        self.pipeline = build_pipeline(self.cfg.training.pipeline, self.model, self.optimizer, self.ctx)
        self.model.train()
        logger.info("training: %d steps (%d per epoch, batch %d x %d ranks), starting at step %d", self.total_steps,
                    self.steps_per_epoch, self.cfg.data.batch_size, self.ctx.world_size, self.state.step)
        self.log.start_summary(self.model)
        batches = self._batches()
        start, stop = self.state.step, False
        with StopSignal(self.ctx) as signals:
            with self.log.progress(start):
                while not stop and self.state.step < self.total_steps and not self.state.early_stopped:
                    try:
                        outputs = self._progress(batches)
                    except StopIteration:
                        break
                    self._advance()
                    stop = self._after_step(outputs)
                    if signals.agreed():  # every rank stops after the same step
                        self.stopped_by, stop = signals.name, True
            self.log.end_summary(self.state, self.metric)
            if self.state.step > start and self._saved_step != self.state.step:
                self._save(f"step-{self.state.step}")
            if not self.stopped_by and signals.agreed():  # during the last save: skip the final evaluation
                self.stopped_by = signals.name
        if self.stopped_by:
            self.log.stopped(self.stopped_by, self.state.step, self.run.checkpoints / f"step-{self.state.step}")
        return self.state

    def _batches(self) -> Iterator[RecBatch]:
        """Training batches from the resume position to the last step, across epochs: one iterator
        keeps the pipeline full at epoch boundaries; the reader is positioned by the batches *trained*
        (not prefetched), so a resumed run neither repeats nor skips a batch."""
        epoch, start = self.state.epoch, self.state.batch_in_epoch
        remaining = self.total_steps - self.state.step
        while remaining > 0:
            self.reader.load_state_dict({"epoch": epoch, "batch": start})
            for batch in self.reader:
                if remaining == 0:
                    return
                remaining -= 1
                yield batch
            epoch, start = epoch + 1, 0

    def _progress(self, batches: Iterator[RecBatch]) -> dict:
        if self._detached:  # re-attach without redoing the in-flight batch's input dist (it breaks an EC's splits)
            self.pipeline.attach(self.model, sparse_dist=False)
            self._detached = False
        return self.pipeline.progress(batches)

    def _advance(self) -> None:
        state = self.state
        state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
        state.samples += self.cfg.data.batch_size * self.ctx.world_size
        if state.batch_in_epoch == self.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def _after_step(self, outputs: dict) -> bool:
        """Logging, checkpoints and validation after a step; True when training should stop."""
        self.log.after_step(self.state, outputs, self.optimizer)
        step, cfg, every = self.state.step, self.cfg, self.cfg.training.eval_every_steps
        due = (every and step % every == 0) or (not every and self.state.batch_in_epoch == 0)  # else each epoch
        stop = bool(self.validation_split and due) and self._validate()
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < self.total_steps
        if stop or periodic:  # once, even when early stopping lands on a periodic step
            self._save(f"step-{step}")
        return stop

    def evaluate(self, split: str, exclude_splits: list[str]) -> dict[str, float]:
        """Evaluate the current weights on ``split`` (collective: every rank must call it)."""
        if self.pipeline is not None and hasattr(self.pipeline, "detach"):
            self.pipeline.detach()  # the sharded modules' own forward, for inference; _progress re-attaches
            self._detached = True
        self.model.eval()
        try:
            request = EvaluationRequest(split, exclude_splits, self.cfg.evaluation, self.cfg.data, self.cfg.training.seed)
            return self.spec.evaluate(self.task, self.dataset, request, self.ctx)
        finally:
            self.model.train()

    def _validate(self) -> bool:
        metrics = self.evaluate(self.validation_split, ["train"])
        state, cfg = self.state, self.cfg.training
        self.log.validation(metrics, state.step)
        value = metrics.get(self.metric)
        if value is None:
            raise TrecError(f"training.early_stopping_metric: '{self.metric}' is not among {', '.join(sorted(metrics))}")
        improved = state.best_metric is None or value > state.best_metric
        logger.info("validation at step %d: %s=%.4f (best %s)", state.step, self.metric, value,
                    f"{state.best_metric:.4f}" if state.best_metric is not None else "-")
        if improved:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
            self._save(BEST)
            return False
        state.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        state.early_stopped = bool(cfg.early_stopping_metric and patience  # saved: a later start trains nothing
                                   and state.evals_without_improvement >= patience)
        if state.early_stopped:
            logger.info("early stopping at step %d: no improvement of %s for %d evaluations (best %.4f at step %d)",
                        state.step, self.metric, patience, state.best_metric, state.best_step)
        return state.early_stopped

    def _save(self, name: str) -> None:
        self.checkpointer.save(name, self.model, self.optimizer, self.state)
        if name != BEST:
            self._saved_step = self.state.step

    def _resume(self) -> None:
        self.checkpointer.discard_incomplete()
        latest = latest_checkpoint(self.run.checkpoints) if self.cfg.checkpoint.resume else None
        if latest is not None:
            state = self.checkpointer.load(latest, self.model, self.optimizer, self.cfg.training.seed)
            self.state = resumable_state(state, latest, self.dataset, self.ctx.world_size)

    def final_evaluation(self, started: float) -> dict[str, float]:
        """Test metrics of the best (or last) weights → RUN/metrics.json and TensorBoard."""
        best = self.run.checkpoints / BEST
        state, step = self.state, self.state.step  # the step of the weights evaluated
        if is_complete(best):
            load_model_weights(best, self.model)
            step = state.best_step
        metrics = self.evaluate("test", self.test_exclusions)
        result = {**metrics, "step": state.step, "best_step": state.best_step, f"val/{self.metric}": state.best_metric,
                  "train_seconds": time.time() - started, "world_size": self.ctx.world_size}
        if self.selection is not None:  # training.validation=auto: what was chosen, and on what
            result |= self.selection.metrics()
        if self.ctx.is_main:
            atomic_write_json(self.run.metrics, result)
            if self.selection is not None:
                self.log.tb.scalars(self.selection.metrics(), state.step)
            self.log.final(metrics, step, self.cfg, self.dataset.manifest)
        self.model.eval()  # the projector encodes items
        self.log.project_items(retriever_of(self.task), self.dataset, self.cfg.data, self.ctx, state.step)
        self.model.train()
        barrier()
        return result


@dataclass
class TrainOutcome:
    """What one ``trec train`` start did."""

    status: str
    """``trained`` (trained to the end and evaluated), ``finished`` (the run had already finished:
    nothing trained, metrics.json untouched) or ``stopped`` (SIGTERM: checkpointed, not evaluated)."""
    step: int
    metrics: dict[str, float]
    """The test metrics (for ``finished``, those metrics.json already holds; empty for ``stopped``)."""
    reason: str = ""


def train(cfg: TrecConfig, run_dir: Path, ctx: DistContext) -> TrainOutcome:
    """Train ``cfg`` into ``run_dir`` (resuming if possible) and evaluate on the test split. A run that
    already finished and has its final evaluation is left as it is; one without it is evaluated.
    With ``training.validation: auto`` and no val split, the number of steps is chosen first
    (:func:`select_steps`) and the run is refit for it."""
    started = time.time()
    new_run = not Path(run_dir).exists()
    try:
        selection = select_steps(cfg, Path(run_dir), ctx) if needs_carved_validation(cfg) else None
        if isinstance(selection, TrainOutcome):  # SIGTERM while choosing: resumes there next time
            return selection
        return _build_and_train(cfg, run_dir, ctx, started, selection)
    except Exception:
        # A new run refused before its first checkpoint (a damaged shard, a NaN label, a config the
        # dataset cannot serve) leaves no run directory behind: the output path is as it was before
        # the command. A run with a checkpoint keeps it (the same command resumes it).
        if new_run and ctx.is_main and latest_checkpoint(RunDir(Path(run_dir)).checkpoints) is None \
                and not has_progress(Path(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _build_and_train(cfg: TrecConfig, run_dir: Path, ctx: DistContext, started: float,
                     selection: StepSelection | None = None) -> TrainOutcome:
    trainer = Trainer.build(cfg, run_dir, ctx, selection)
    try:
        latest = latest_checkpoint(trainer.run.checkpoints) if cfg.checkpoint.resume else None
        reason = finished_reason(read_trainer_state(latest), trainer.total_steps) if latest is not None else None
        if reason is not None:  # early-stopped, or the final step reached
            metrics = final_metrics(trainer.run)
            if metrics is not None:
                step = int(metrics["step"])
                logger.info("run already finished at step %d (%s); nothing to train", step, reason)
                return TrainOutcome("finished", step, metrics, reason)
            logger.info("run finished training (%s) but has no final evaluation: evaluating it", reason)
        state = trainer.fit()
        if trainer.stopped_by:
            return TrainOutcome("stopped", state.step, {}, trainer.stopped_by)
        return TrainOutcome("trained", state.step, trainer.final_evaluation(started))
    finally:
        if trainer.log is not None:
            trainer.log.close()


def select_steps(cfg: TrecConfig, run_dir: Path, ctx: DistContext) -> StepSelection | TrainOutcome:
    """Early-stop a run on a validation split carved from train (:mod:`trec.selection`) and return the
    steps of the refit on the whole train split (collective); a restart reuses the choice."""
    dataset = PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
    fingerprint = dataset_fingerprint(dataset)
    selection = chosen_steps(run_dir, fingerprint, dataset)
    if selection is not None:
        return selection
    carved = carved_split(cfg, run_dir, fingerprint, dataset, ctx)
    trainer = Trainer.build(replace(cfg, data=replace(cfg.data, path=str(carved))), validation_root(run_dir) / "run",
                            ctx)
    try:
        state = trainer.fit()
    finally:
        if trainer.log is not None:
            trainer.log.close()
    if trainer.stopped_by:
        return TrainOutcome("stopped", state.step, {}, trainer.stopped_by)
    counts, best_step = trainer.dataset.manifest["counts"], state.best_step if state.best_step > 0 else state.step
    train_rows = dataset.num_rows("train")
    selection = StepSelection(fingerprint, trainer.metric, float(state.best_metric or 0.0), best_step,
                              counts["train"], counts["val"], train_rows,
                              max(1, round(best_step * train_rows / counts["train"])))
    record_choice(run_dir, selection, ctx)
    return selection
