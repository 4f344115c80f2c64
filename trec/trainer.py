"""The one training loop, for every trec model.

    trainer = Trainer.build(cfg, run_dir, ctx)
    trainer.fit()            # resumes from RUN/checkpoints if a complete checkpoint exists
    trainer.final_evaluation()

A model only contributes its task (``forward(batch) -> (loss, outputs)``, an optional reader
hook for negatives) and its evaluation, via :mod:`trec.models`. The loop owns everything
else: the pipeline (``TrainPipelineSparseDist``, or torchrec's plain ``TrainPipelineBase``),
periodic validation with early stopping and best-model tracking, checkpoints, throughput
logging and TensorBoard.

Resuming never damages a run: a start that changes a key affecting shapes or semantics is
refused before anything is written (:func:`trec.runs.check_resumable_config`), config.yaml and
run.json are written only once the model is built and the checkpoint loaded, and a finished run
(final step reached or early-stopped) trains nothing. SIGTERM (what Kubernetes sends before it
kills a pod) stops training at the next step boundary with a checkpoint (:class:`_StopSignal`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from trec.checkpoint import (BEST, Checkpointer, TrainerState, is_complete, latest_checkpoint, load_model_weights,
                             read_trainer_state)
from trec.config import PipelineKind, TrecConfig, config_to_dict, save_config
from trec.data import InteractionReader, PreparedDataset, RecBatch
from trec.distributed import DistContext, barrier
from trec.errors import TrecError
from trec.evaluation.retrieval import check_cutoffs
from trec.io import atomic_write_json, read_json_object
from trec.metrics import MetricsLogger
from trec.models import ModelSpec, model_spec
from trec.optim import build_optimizer, current_learning_rates
from trec.runs import (RunDir, build_sharded_task, check_resumable_config, check_run_dataset, dataset_fingerprint,
                       finished_reason, read_run_record, short, write_run_record)

logger = logging.getLogger("trec")


def total_training_steps(cfg: TrecConfig, steps_per_epoch: int) -> int:
    return cfg.training.max_steps or cfg.training.epochs * steps_per_epoch


def evaluation_splits(dataset: PreparedDataset) -> tuple[str | None, list[str]]:
    """(validation split or None, splits excluded from the final test ranking)."""
    validation = "val" if dataset.has_split("val") else None
    return validation, ["train"] + (["val"] if validation else [])


def excluded_splits(dataset: PreparedDataset, split: str) -> list[str]:
    """Splits whose items are left out when ranking for ``split``: everything before test, or train."""
    return evaluation_splits(dataset)[1] if split == "test" else ["train"]


class Trainer:
    """Runs ``fit`` for one task; build it with :meth:`Trainer.build`."""

    def __init__(self, cfg, run, ctx, dataset, spec, model, task, reader, optimizer, checkpointer) -> None:
        self.cfg: TrecConfig = cfg
        self.run = run
        self.ctx: DistContext = ctx
        self.dataset: PreparedDataset = dataset
        self.spec: ModelSpec = spec
        self.model = model
        self.task = task
        self.reader: InteractionReader = reader
        self.optimizer = optimizer
        self.checkpointer: Checkpointer = checkpointer
        self.steps_per_epoch = len(reader)
        self.total_steps = total_training_steps(cfg, self.steps_per_epoch)
        self.metric = cfg.training.early_stopping_metric or spec.default_metric
        self.validation_split, self.test_exclusions = evaluation_splits(dataset)
        self.state = TrainerState(world_size=ctx.world_size, dataset_fingerprint=dataset_fingerprint(dataset))
        self.record: dict | None = None
        """RUN/run.json as it was when the trainer was built (None: not written yet)."""
        self.stopped_by: str | None = None
        """The signal that stopped :meth:`fit` early (a checkpoint was saved), or None."""
        self._saved_step: int | None = None
        self.tb: MetricsLogger | None = None
        self.pipeline = None

    @classmethod
    def build(cls, cfg: TrecConfig, run_dir: Path, ctx: DistContext) -> "Trainer":
        """Check that ``cfg`` and its dataset may (re)start the run, then build everything (collective).

        A run with a complete checkpoint is refused a config that changes its shapes or meaning
        and a dataset other than its own, before anything is written. Nothing of the run is
        written here besides its directory (and a model's setup cache, e.g. mined hard
        negatives): :meth:`fit` writes config.yaml and run.json once the checkpoint is loaded.
        """
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
        spec = model_spec(cfg.model)
        model, task = build_sharded_task(cfg, dataset, ctx, train=True)
        if spec.setup is not None:
            spec.setup(task, cfg, dataset, ctx, run.root)
        reader = InteractionReader(
            dataset,
            "train",
            batch_size=cfg.data.batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=cfg.training.seed,
            shuffle=cfg.data.shuffle,
            prefetch_batches=cfg.data.prefetch_batches,
            history_max_len=cfg.data.history_max_len,
            exclude_target_from_history=True,
            augment=getattr(task, "augment", None),
        )
        if len(reader) == 0:
            raise TrecError(
                f"{cfg.data.path}: the train split has fewer rows per rank than data.batch_size={cfg.data.batch_size}"
            )
        optimizer = build_optimizer(model, cfg.optimizer, total_training_steps(cfg, len(reader)))
        checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint, ctx)
        trainer = cls(cfg, run, ctx, dataset, spec, model, task, reader, optimizer, checkpointer)
        trainer.record = record
        return trainer

    def finished(self) -> str | None:
        """Why the run's newest checkpoint has nothing left to train (early-stopped, or the final
        step reached), or None. Reads only that checkpoint's trainer_state.json."""
        latest = latest_checkpoint(self.run.checkpoints) if self.cfg.checkpoint.resume else None
        return finished_reason(read_trainer_state(latest), self.total_steps) if latest is not None else None

    def final_metrics(self) -> dict | None:
        """RUN/metrics.json if it holds the final evaluation of the newest checkpoint, else None."""
        latest = latest_checkpoint(self.run.checkpoints)
        if latest is None or not self.run.metrics.is_file():
            return None
        metrics = read_json_object(self.run.metrics)
        return metrics if metrics.get("step") == read_trainer_state(latest).step else None

    # ------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------

    def fit(self) -> TrainerState:
        """Train from the newest complete checkpoint (or from scratch) to ``total_steps``.

        Stops early on early stopping, or at the first step boundary after SIGTERM
        (:attr:`stopped_by` is set); either way the last step trained is checkpointed.
        """
        self._resume()
        self._record_run()
        self.tb = MetricsLogger(
            self.run.tensorboard if self.ctx.is_main else None,
            self.cfg.logging.tensorboard,
            purge_step=self.state.step + 1 if self.state.step else None,
        )
        self.pipeline = self._build_pipeline()
        self.model.train()
        logger.info(
            "training: %d steps (%d per epoch, batch %d x %d ranks), starting at step %d",
            self.total_steps, self.steps_per_epoch, self.cfg.data.batch_size, self.ctx.world_size, self.state.step,
        )
        batches = self._batches()
        progress = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.ctx.is_main,
                        desc="train", unit="step", dynamic_ncols=True,
                        # Under torchrun/torchx the output is a pipe: redraw rarely so logs stay readable.
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        window = _Throughput(self.cfg.data.batch_size * self.ctx.world_size)
        start, stop = self.state.step, False
        with _StopSignal(self.ctx) as signals:
            try:
                while not stop and self.state.step < self.total_steps and not self.state.early_stopped:
                    try:
                        outputs = self.pipeline.progress(batches)
                    except StopIteration:
                        break
                    self._advance()
                    window.step()
                    progress.update(1)
                    stop = self._after_step(outputs, window, progress)
                    if signals.agreed():  # every rank stops after the same step
                        self.stopped_by, stop = signals.name, True
            finally:
                progress.close()  # ends the bar's line: an error message must start on a line of its own
            if self.state.step > start and self._saved_step != self.state.step:
                self._save(f"step-{self.state.step}")
            if not self.stopped_by and signals.agreed():  # during the last save: skip the final evaluation
                self.stopped_by = signals.name
        if self.stopped_by and self.ctx.is_main:
            logger.warning("%s received: stopped at step %d of %d with checkpoint %s; run the same command to "
                           "resume from it", self.stopped_by, self.state.step, self.total_steps,
                           self.run.checkpoints / f"step-{self.state.step}")
        return self.state

    def _build_pipeline(self):
        from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

        if self.cfg.training.pipeline == PipelineKind.sparse_dist:
            return TrainPipelineSparseDist(self.model, self.optimizer, self.ctx.device)
        return TrainPipelineBase(self.model, self.optimizer, self.ctx.device)

    def _batches(self) -> Iterator[RecBatch]:
        """Training batches from the resume position to the last step, across epochs.

        One iterator over all epochs keeps the pipeline full at epoch boundaries; the reader is
        positioned by the number of batches *trained* (not prefetched), so a resumed run
        neither repeats nor skips a batch.
        """
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

    def _advance(self) -> None:
        state = self.state
        state.step += 1
        state.samples += self.cfg.data.batch_size * self.ctx.world_size
        state.batch_in_epoch += 1
        if state.batch_in_epoch == self.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def _after_step(self, outputs: dict[str, torch.Tensor], window: "_Throughput", progress) -> bool:
        """Logging, checkpoints and validation after a step; True when training should stop."""
        step, cfg = self.state.step, self.cfg
        if step % cfg.logging.log_every_steps == 0 or step == self.total_steps:
            self._log_step(outputs, window, progress)
        if cfg.logging.histogram_every_steps and step % cfg.logging.histogram_every_steps == 0:
            for name in ("user_norm", "item_norm"):
                if name in outputs:
                    self.tb.histogram(f"embedding_norm/{name}", outputs[name], step)
        epoch_end = self.state.batch_in_epoch == 0
        every = cfg.training.eval_every_steps
        stop = False
        if self.validation_split and ((every and step % every == 0) or (not every and epoch_end)):
            stop = self._validate()
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < self.total_steps
        if stop or periodic:  # once, even when early stopping lands on a periodic step
            self._save(f"step-{step}")
        return stop

    def _log_step(self, outputs, window: "_Throughput", progress) -> None:
        loss = _mean_across_ranks(outputs["loss"])
        lrs = current_learning_rates(self.optimizer)
        rate = window.rate()
        # refresh=False: the bar redraws at its own pace, so piped output is not flooded with bars.
        progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
        logger.info("step %d/%d loss %.4f lr %s %.0f samples/s", self.state.step, self.total_steps, loss,
                    " ".join(f"{k}={v:.2e}" for k, v in lrs.items()), rate)
        self.tb.scalars({"loss": loss, "samples_per_second": rate, "epoch": self.state.epoch}, self.state.step, "train/")
        self.tb.scalars(lrs, self.state.step, "lr/")

    # ------------------------------------------------------------------------------------
    # validation, checkpoints, resume
    # ------------------------------------------------------------------------------------

    def evaluate(self, split: str, exclude_splits: list[str]) -> dict[str, float]:
        """Evaluate the current weights on ``split`` (collective: every rank must call it)."""
        if self.pipeline is not None and hasattr(self.pipeline, "detach"):
            self.pipeline.detach()  # restore the sharded modules' own forward for inference
        self.model.eval()
        try:
            return self.spec.evaluate(self.task, self.dataset, split, exclude_splits, self.cfg, self.ctx)
        finally:
            self.model.train()

    def _validate(self) -> bool:
        metrics = self.evaluate(self.validation_split, ["train"])
        state, cfg = self.state, self.cfg.training
        self.tb.scalars(metrics, state.step, "val/")
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
        if cfg.early_stopping_metric and patience and state.evals_without_improvement >= patience:
            state.early_stopped = True  # saved with the step's checkpoint: a later start trains nothing
            logger.info("early stopping at step %d: no improvement of %s for %d evaluations (best %.4f at step %d)",
                        state.step, self.metric, patience, state.best_metric, state.best_step)
            return True
        return False

    def _save(self, name: str) -> None:
        self.checkpointer.save(name, self.model, self.optimizer, self.state)
        if name != BEST:
            self._saved_step = self.state.step

    def _record_run(self) -> None:
        """config.yaml and run.json (rank 0, atomically), written only once the model is built and
        any checkpoint loaded, so a start that fails before leaves the run's record as it was."""
        if not self.ctx.is_main:
            return
        save_config(self.cfg, self.run.config)
        fingerprint = self.state.dataset_fingerprint
        if self.record is None or self.record["dataset"]["fingerprint"] != fingerprint:
            if self.record is None and self.state.step:
                logger.warning("%s: binding this run (trained before run.json existed) to %s (fingerprint %s)",
                               self.run.root, self.dataset.path, short(fingerprint))
            self.record = write_run_record(self.run, self.dataset, self.record)

    def _resume(self) -> None:
        self.checkpointer.discard_incomplete()
        if not self.cfg.checkpoint.resume:
            return
        latest = latest_checkpoint(self.run.checkpoints)
        if latest is None:
            return
        state = self.checkpointer.load(latest, self.model, self.optimizer, self.cfg.training.seed)
        ours = self.state.dataset_fingerprint
        if state.dataset_fingerprint and state.dataset_fingerprint != ours:
            raise TrecError(f"{latest}: trained on a dataset with fingerprint {short(state.dataset_fingerprint)}, but "
                            f"{self.dataset.path} has fingerprint {short(ours)}; resume on the dataset it was "
                            "trained on, or train a new --run-dir")
        state.dataset_fingerprint = ours  # a checkpoint from before fingerprints were recorded
        if state.world_size != self.ctx.world_size:
            # The split is re-partitioned across a different number of ranks: keep the epoch and
            # the share of it already trained; the exact batch order cannot carry over.
            state.batch_in_epoch = state.batch_in_epoch * state.world_size // self.ctx.world_size
            logger.warning("resuming a %d-rank checkpoint on %d ranks: data order within the epoch changes",
                           state.world_size, self.ctx.world_size)
            state.world_size = self.ctx.world_size
        self.state = state

    # ------------------------------------------------------------------------------------
    # final evaluation
    # ------------------------------------------------------------------------------------

    def final_evaluation(self, started: float) -> dict[str, float]:
        """Test metrics of the best (or last) weights → RUN/metrics.json and TensorBoard."""
        best = self.run.checkpoints / BEST
        if is_complete(best):
            load_model_weights(best, self.model)
        metrics = self.evaluate("test", self.test_exclusions)
        result = {
            **metrics,
            "step": self.state.step,
            "best_step": self.state.best_step,
            f"val/{self.metric}": self.state.best_metric,
            "train_seconds": time.time() - started,
            "world_size": self.ctx.world_size,
        }
        if self.ctx.is_main:
            atomic_write_json(self.run.metrics, result)
            self.tb.scalars(metrics, self.state.step, "test/")
            self.tb.hparams(_flat_hparams(self.cfg), {k: v for k, v in metrics.items() if "/" not in k and k != "users"})
        self._project_items()
        barrier()
        return result

    def _project_items(self) -> None:
        """A sample of item embeddings (with titles where known) for TensorBoard's projector."""
        count = min(self.cfg.logging.projector_items, self.dataset.num_items)
        encode = getattr(getattr(self.task, "model", None), "item_embeddings", None)
        if count <= 0 or encode is None or not self.cfg.logging.tensorboard:
            return
        from trec.evaluation.retrieval import encode_all_items

        popular = torch.as_tensor(self.dataset.item_counts).argsort(descending=True)[:count].numpy()
        ids = np.sort(popular)  # only these are encoded, not the whole catalog
        self.model.eval()
        items = encode_all_items(encode, self.dataset, self.cfg.data.eval_batch_size, self.ctx,
                                 self.cfg.data.history_max_len, ids)
        self.model.train()
        titles = self.dataset.item_titles()
        raw = self.dataset.id_labels("item_id")  # hash-mapped IDs too
        labels = [str(titles[i]) if titles else str(raw[i]) for i in popular.tolist()]
        self.tb.projector(items[torch.as_tensor(np.searchsorted(ids, popular), device=items.device)], labels,
                          self.state.step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _StopSignal:
    """SIGTERM as a request to stop at the next step boundary, agreed on by every rank.

    Kubernetes sends SIGTERM before it kills a pod (and torchrun forwards it to every worker);
    the handler only sets a flag. Ranks may see the signal at different steps, so
    :meth:`agreed` all-reduces the flag (MAX) at every step boundary: all ranks stop after the
    same step and save one consistent checkpoint. The flag is a CPU tensor reduced over gloo (a
    side group when training on NCCL), so it never waits on the GPU; one scalar per step.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.received: int | None = None
        self.name = "SIGTERM"
        self._previous = None
        self._group = None

    def __enter__(self) -> "_StopSignal":
        import torch.distributed as dist

        if self.ctx.world_size > 1 and dist.is_initialized() and self.ctx.backend != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank enters fit together
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received the signal (collective)."""
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if self.ctx.world_size > 1 and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def __exit__(self, kind, error, traceback) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if error is not None and self.received is not None:
            # After SIGTERM, a failing step or collective means a peer is already gone (torchrun stops
            # the survivors of a dead worker with SIGTERM): no checkpoint can be agreed on, so end the
            # way SIGTERM ends a process, without a traceback; the newest complete checkpoint stands.
            logger.warning("SIGTERM received and the process group failed (%s: %s): exiting without a checkpoint",
                           kind.__name__, str(error).splitlines()[0] if str(error) else "")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(128 + signal.SIGTERM)


class _Throughput:
    """samples/s over the window since the last ``rate()`` call."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.steps = 0
        self.since = time.perf_counter()

    def step(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.steps * self.samples_per_step / max(now - self.since, 1e-9)
        self.steps, self.since = 0, now
        return value


def _mean_across_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _flat_hparams(cfg: TrecConfig) -> dict[str, object]:
    flat: dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        elif isinstance(node, list):
            flat[prefix[:-1]] = str(node)
        else:
            flat[prefix[:-1]] = node

    sections = config_to_dict(cfg)
    for section in ("model", "optimizer", "training", "data"):
        walk(f"{section}.", sections[section])
    return flat


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
    """Train ``cfg`` into ``run_dir`` (resuming if possible) and evaluate on the test split.

    A run that already finished (final step reached, or early-stopped) and has its final
    evaluation is left as it is; one that finished training but not its evaluation is evaluated.
    """
    started = time.time()
    new_run = not Path(run_dir).exists()
    try:
        return _build_and_train(cfg, run_dir, ctx, started)
    except Exception:
        # A new run refused before its first checkpoint (a damaged shard, a NaN label, a config the
        # dataset cannot serve) leaves no run directory behind: the output path is as it was before
        # the command. A run with a checkpoint keeps it (the same command resumes it).
        if new_run and ctx.is_main and latest_checkpoint(RunDir(Path(run_dir)).checkpoints) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _build_and_train(cfg: TrecConfig, run_dir: Path, ctx: DistContext, started: float) -> TrainOutcome:
    trainer = Trainer.build(cfg, run_dir, ctx)
    try:
        reason = trainer.finished()
        if reason is not None:
            metrics = trainer.final_metrics()
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
        trainer.close()
