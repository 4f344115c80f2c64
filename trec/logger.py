"""What the training loop reports: step lines, TensorBoard, throughput, hparams, the projector.

    log = TrainLogger(cfg.logging, run.tensorboard, ctx, total_steps, samples_per_step, start_step)
    log.start_summary(model)                 # tables, plan, bytes per rank, parameters
    with log.progress(start_step):
        ...                                  # each step:
        log.after_step(state, outputs, optimizer)
    log.end_summary(state, metric)           # elapsed, samples/s, best step
    log.validation(metrics, step)
    log.final(metrics, step, cfg, manifest)  # test/ scalars and hparams
    log.close()

What it logs is chosen by role, never by model: in a task's ``outputs``, ``loss`` and every
other 0-d tensor are averaged over the ranks and logged as ``train/NAME`` scalars, and every 1-d
tensor as a histogram (``embedding_norm/NAME`` for a ``*_norm`` output, else ``train/NAME``),
every ``histogram_every_steps`` and at the last step trained. A task that outputs per-row click
``logits`` and ``labels`` also gets ``train/auc`` and ``train/ne`` of the window since the last
log line (:class:`~trec.metrics.TrainClickWindow`). Evaluation metrics of another source
(``popularity/ndcg@10``) go to that source's run (``tb/popularity``) under the model's tag
(``val/ndcg@10``), so TensorBoard draws both on one card. Hyperparameters go through the hparams
plugin into the run itself (:func:`flat_hparams`), beside its ``test/`` scalars.

Under a terminal a progress bar redraws; under torchrun/torchx (a pipe) there is no bar and the
step lines carry the progress and ETA. Only rank 0 writes TensorBoard and logs; the other ranks
take part in the collectives only.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trec.checkpoint import TrainerState
from trec.config import DataConfig, LoggingConfig, TrecConfig, config_to_dict
from trec.distributed import DistContext, dist_gather, dist_mean
from trec.memory import peak_rss_bytes
from trec.metrics import TrainClickWindow
from trec.optim import current_learning_rates
from trec.run_summary import format_duration, plan_summary

logger = logging.getLogger("trec")


class TensorBoard:
    """TensorBoard writer for rank 0 (a no-op elsewhere, or when disabled).

    ``purge_step`` makes TensorBoard drop events a crashed earlier attempt wrote at or after
    that step, so a resumed run never shows a step twice.
    """

    def __init__(self, log_dir: Path | None, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        self.log_dir, self.purge_step = log_dir, purge_step
        self.runs: dict[str, object] = {}  # sub-run name -> its writer (e.g. popularity)
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def _writer(self, run: str):
        """This run's writer, or a sub-run's (``log_dir/run``: TensorBoard overlays its tags on ours)."""
        if not run or self.writer is None:
            return self.writer
        if run not in self.runs:
            from torch.utils.tensorboard import SummaryWriter

            self.runs[run] = SummaryWriter(log_dir=str(Path(self.log_dir) / run), purge_step=self.purge_step)
        return self.runs[run]

    def scalars(self, values: dict[str, float], step: int, prefix: str = "", run: str = "") -> None:
        writer = self._writer(run)
        if writer is None:
            return
        for name, value in values.items():
            writer.add_scalar(f"{prefix}{name}", value, step)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(name, values.detach().float().cpu(), step)

    def hparams(self, params: dict[str, object], metric_tags: list[str]) -> None:
        """The hparams plugin's summaries, written into this run. Not ``add_hparams``: it writes a
        sub-run with a copy of each metric as a ``hparam/*`` scalar card. ``metric_tags`` name
        scalars this run already has (``test/ndcg@10``); the plugin shows their last value."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        for summary in hparams(clean, dict.fromkeys(metric_tags, 0.0)):  # exp, session start, session end
            self.writer.file_writer.add_summary(summary)

    def projector(self, vectors: torch.Tensor, labels: list[str], step: int, tag: str = "items") -> None:
        if self.writer is not None and len(labels):
            self.writer.add_embedding(vectors.detach().float().cpu(), metadata=labels, global_step=step, tag=tag)

    def close(self) -> None:
        for writer in [self.writer, *self.runs.values()]:
            if writer is not None:
                writer.flush()
                writer.close()


class Throughput:
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


# Always in the hparams table, whatever their value: what a reader compares runs by first.
KEY_HPARAMS = ("model.name", "model.embedding_dim", "optimizer.sparse", "optimizer.sparse_lr", "optimizer.dense",
               "optimizer.dense_lr", "data.batch_size", "training.seed")
# Never: where the data is, how it is read, how it was prepared (the manifest says that), the
# reported cutoffs, and the other models' sections.
_NOT_HPARAMS = ("data.path", "data.prepare.", "data.eval_batch_size", "data.prefetch_batches", "evaluation.ks")


def _dotted(node, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a nested dict (lists as strings)."""
    if isinstance(node, dict):
        return {key: value for name, child in node.items() for key, value in _dotted(child, f"{prefix}{name}.").items()}
    return {prefix[:-1]: str(node) if isinstance(node, list) else node}


def dataset_hparams(manifest: dict) -> dict[str, object]:
    """How the dataset was really prepared, from its manifest.json (``dataset.*``)."""
    split, mapping, counts = manifest.get("split", {}), manifest.get("id_mapping", {}), manifest.get("counts", {})
    values = {"source": manifest.get("source", {}).get("kind"), "split": split.get("kind"),
              "test_fraction": split.get("test_fraction"), "val_fraction": split.get("val_fraction"),
              "seed": split.get("seed", manifest.get("seed")), "id_mapping": mapping.get("kind"),
              "history_max_len": manifest.get("history_max_len"), "users": manifest.get("num_users"),
              "items": manifest.get("num_items"), "train_rows": counts.get("train")}
    return {f"dataset.{key}": value for key, value in values.items() if value is not None}


def flat_hparams(cfg: TrecConfig, manifest: dict | None = None, world_size: int = 1) -> dict[str, object]:
    """A short hparams table: :data:`KEY_HPARAMS`, every other model, optimizer, training, data and
    evaluation setting that differs from its default, the world size, and the dataset's real
    preparation (:func:`dataset_hparams`; ``data.prepare`` only holds defaults for a prepared dataset)."""
    ours, defaults = _dotted(config_to_dict(cfg)), _dotted(config_to_dict(type(cfg)()))
    sections = ("model.name", "model.embedding_dim", "model.tables", f"model.{cfg.model.name}.", "optimizer.",
                "training.", "data.", "evaluation.")
    changed = {key: value for key, value in ours.items() if key.startswith(sections)
               and not key.startswith(_NOT_HPARAMS) and value != defaults.get(key)}
    if cfg.training.max_steps:  # it replaces the epochs
        changed.pop("training.epochs", None)
    return {**{key: ours[key] for key in KEY_HPARAMS}, **changed, "world_size": world_size,
            **dataset_hparams(manifest or {})}


def histogram_tag(name: str) -> str:
    """The TensorBoard tag of a 1-d output: embedding norms in their own group."""
    return f"embedding_norm/{name}" if name.endswith("_norm") else f"train/{name}"


def _is_tensor(value: object, dims: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == dims


def _histograms(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 1-d outputs drawn as histograms (click labels are targets, not something learned)."""
    return {name: value for name, value in outputs.items() if _is_tensor(value, 1) and name != "labels"}


class TrainLogger:
    """Reports one training start: log lines, the progress bar and TensorBoard (rank 0)."""

    def __init__(self, cfg: LoggingConfig, log_dir: Path, ctx: DistContext, total_steps: int,
                 samples_per_step: int, start_step: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.is_main = ctx.is_main
        self.tb = TensorBoard(log_dir if ctx.is_main else None, cfg.tensorboard,
                              purge_step=start_step + 1 if start_step else None)
        self.samples_per_step, self.world_size = samples_per_step, ctx.world_size
        self.window = Throughput(samples_per_step)
        self.clicks = TrainClickWindow(ctx.world_size, ctx.rank, cfg.log_every_steps, ctx.device)
        self.bar: tqdm | None = None
        self.first_step, self.started, self.ended = start_step, time.perf_counter(), None
        self.last: tuple[int, dict[str, torch.Tensor]] | None = None  # the last step trained, its outputs
        self.histogram_step = -1

    def start_summary(self, model) -> None:
        """Log (rank 0) what is trained where: the tables, the plan, bytes per rank, parameter counts."""
        if self.is_main:
            logger.info("%s", plan_summary(model, self.world_size))

    @contextmanager
    def progress(self, step: int) -> Iterator[None]:
        """From ``step`` to the last step: a progress bar on rank 0 under a terminal, closed however the
        block ends (under a pipe, torchrun or torchx, no bar: the step lines carry progress and ETA).
        At a normal end, the histograms of the last step trained if it had none."""
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not (self.is_main and tty),
                        desc="train", unit="step", dynamic_ncols=True)
        self.window = Throughput(self.samples_per_step)  # the first window starts with the loop
        self.first_step, self.started = step, time.perf_counter()
        try:
            with logging_redirect_tqdm() if tty else nullcontext():  # log lines above the bar, not through it
                yield
        finally:
            self.bar.close()  # ends the bar's line: an error message must start on a line of its own
            self.bar, self.ended = None, time.perf_counter()
        if self.cfg.histogram_every_steps and self.last is not None and self.last[0] != self.histogram_step:
            self._histograms(*self.last)  # a run shorter than histogram_every_steps still has them

    def after_step(self, state: TrainerState, outputs: dict[str, torch.Tensor], optimizer) -> None:
        """Count the step; every ``log_every_steps`` (and at the last step) log it (collective:
        the scalars are averaged over the ranks); every ``histogram_every_steps`` the histograms."""
        self.window.step()
        if self.bar is not None:
            self.bar.update(1)
        step = state.step
        if _is_tensor(outputs.get("logits"), 1) and _is_tensor(outputs.get("labels"), 1):
            self.clicks.update(outputs["logits"], outputs["labels"])
        self.last = (step, outputs)
        if step % self.cfg.log_every_steps == 0 or step == self.total_steps:
            self._log_step(state, outputs, optimizer)
        if self.cfg.histogram_every_steps and step % self.cfg.histogram_every_steps == 0:
            self._histograms(step, outputs)

    def _histograms(self, step: int, outputs: dict[str, torch.Tensor]) -> None:
        for name, values in _histograms(outputs).items():
            self.tb.histogram(histogram_tag(name), values, step)
        self.histogram_step = step

    def _log_step(self, state: TrainerState, outputs: dict[str, torch.Tensor], optimizer) -> None:
        names = ["loss", *(name for name, value in outputs.items() if _is_tensor(value, 0) and name != "loss")]
        # One all-reduce for every scalar of the step (the same names on every rank: one task).
        means = dist_mean(torch.stack([outputs[name].detach().float() for name in names])).tolist()
        scalars = dict(zip(names, means)) | self.clicks.compute()  # train/auc, train/ne (collective)
        loss, lrs, rate = scalars["loss"], current_learning_rates(optimizer), self.window.rate()
        if self.bar is not None:
            # refresh=False: the bar redraws at its own pace.
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
        logger.info("step %d/%d loss %.4f lr %s %.0f samples/s %s", state.step, self.total_steps, loss,
                    " ".join(f"{k}={v:.2e}" for k, v in lrs.items()), rate, self._eta(state.step))
        self.tb.scalars({**scalars, "samples_per_second": rate, "epoch": state.epoch}, state.step, "train/")
        self.tb.scalars(lrs, state.step, "lr/")
        # Every rank's peak RSS (collective): the rank outgrowing its memory budget shows here first.
        rss = {f"peak_rss_gb_rank{rank}": gb for rank, gb in enumerate(dist_gather(peak_rss_bytes() / 1024**3))}
        self.tb.scalars(rss, state.step, "system/")

    def _eta(self, step: int) -> str:
        """``7.6% ETA 4m12s``: the share of the run done, and the time left at this start's mean pace
        (validations included)."""
        done, elapsed = step - self.first_step, time.perf_counter() - self.started
        left = elapsed / max(done, 1) * (self.total_steps - step)
        return f"{100.0 * step / max(self.total_steps, 1):.1f}% ETA {format_duration(left)}"

    def end_summary(self, state: TrainerState, metric: str) -> None:
        """Log (rank 0) how the loop went: steps, elapsed time, samples/s, the best validation step."""
        steps = state.step - self.first_step
        if not self.is_main or self.ended is None or steps <= 0:  # nothing trained: a finished run evaluated
            return
        elapsed = self.ended - self.started
        best = (f"best val {metric} {state.best_metric:.4f} at step {state.best_step}"
                if state.best_metric is not None else "no validation")
        logger.info("trained %d steps (%d to %d) in %s, %.0f samples/s; %s", steps, self.first_step, state.step,
                    format_duration(elapsed), steps * self.samples_per_step / max(elapsed, 1e-9), best)

    def stopped(self, signal: str, step: int, checkpoint: Path) -> None:
        if self.is_main:
            logger.warning("%s received: stopped at step %d of %d with checkpoint %s; run the same command to "
                           "resume from it", signal, step, self.total_steps, checkpoint)

    def validation(self, metrics: dict[str, float], step: int) -> None:
        self._split_scalars(metrics, step, "val")

    def _split_scalars(self, metrics: dict[str, float], step: int, split: str) -> None:
        """``ndcg@10`` as ``SPLIT/ndcg@10``; another source's ``popularity/ndcg@10`` under the same tag in
        the ``popularity`` run, so that TensorBoard draws the baseline on the model's card."""
        for key, value in metrics.items():
            source, _, name = key.rpartition("/")
            self.tb.scalars({name: value}, step, f"{split}/", run=source)

    def final(self, metrics: dict[str, float], step: int, cfg: TrecConfig, manifest: dict | None = None) -> None:
        """The test metrics as ``test/`` scalars at ``step`` (that of the weights evaluated), and the
        run's hyperparameters (:func:`flat_hparams`, ``manifest``: the dataset's) beside them."""
        self._split_scalars(metrics, step, "test")
        tags = [f"test/{name}" for name in metrics if "/" not in name and name != "users"]
        self.tb.hparams(flat_hparams(cfg, manifest, self.world_size), tags)

    def project_items(self, retriever, dataset, data: DataConfig, ctx: DistContext, step: int) -> None:
        """A sample of item embeddings (the most popular, with titles where known) for TensorBoard's
        projector (collective: every rank encodes its share). ``retriever``: the task's
        :class:`~trec.models.Retriever` (None: nothing to project), in eval mode."""
        count = min(self.cfg.projector_items, dataset.num_items)
        if count <= 0 or retriever is None or not self.cfg.tensorboard:
            return
        from trec.evaluation.retrieval import encode_all_items

        popular = torch.as_tensor(dataset.item_counts).argsort(descending=True)[:count].numpy()
        ids = np.sort(popular)  # only these are encoded, not the whole catalog
        items = encode_all_items(retriever.encode_items, dataset, data.eval_batch_size, ctx, data.history_max_len, ids)
        titles = dataset.item_titles()
        raw = dataset.id_labels("item_id")  # hash-mapped IDs too
        labels = [str(titles[i]) if titles else str(raw[i]) for i in popular.tolist()]
        self.tb.projector(items[torch.as_tensor(np.searchsorted(ids, popular), device=items.device)], labels, step)

    def close(self) -> None:
        self.tb.close()
