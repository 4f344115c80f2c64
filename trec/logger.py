"""What the training loop reports: step lines, TensorBoard, throughput, hparams, the projector.

    log = TrainLogger(cfg.logging, run.tensorboard, ctx, total_steps, samples_per_step, start_step)
    with log.progress(start_step):
        ...                                  # each step:
        log.after_step(state, outputs, optimizer)
    log.validation(metrics, step)
    log.final(metrics, step, cfg)            # test/ scalars and hparams
    log.close()

What it logs is chosen by role, never by model: in a task's ``outputs``, ``loss`` and every
other 0-d tensor are averaged over the ranks and logged as ``train/NAME`` scalars, and every 1-d
tensor as a histogram (``embedding_norm/NAME`` for a ``*_norm`` output, else ``train/NAME``).
Only rank 0 writes TensorBoard; the other ranks take part in the collectives only.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from trec.checkpoint import TrainerState
from trec.config import DataConfig, LoggingConfig, TrecConfig, config_to_dict
from trec.distributed import DistContext, dist_mean
from trec.optim import current_learning_rates

logger = logging.getLogger("trec")


class TensorBoard:
    """TensorBoard writer for rank 0 (a no-op elsewhere, or when disabled).

    ``purge_step`` makes TensorBoard drop events a crashed earlier attempt wrote at or after
    that step, so a resumed run never shows a step twice.
    """

    def __init__(self, log_dir: Path | None, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", value, step)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(name, values.detach().float().cpu(), step)

    def hparams(self, params: dict[str, object], metrics: dict[str, float]) -> None:
        if self.writer is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def projector(self, vectors: torch.Tensor, labels: list[str], step: int, tag: str = "items") -> None:
        if self.writer is not None and len(labels):
            self.writer.add_embedding(vectors.detach().float().cpu(), metadata=labels, global_step=step, tag=tag)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


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


def flat_hparams(cfg: TrecConfig) -> dict[str, object]:
    """The model, optimizer, training and data sections as {dotted key: value} (lists as strings)."""
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


def histogram_tag(name: str) -> str:
    """The TensorBoard tag of a 1-d output: embedding norms in their own group."""
    return f"embedding_norm/{name}" if name.endswith("_norm") else f"train/{name}"


def _is_tensor(value: object, dims: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == dims


class TrainLogger:
    """Reports one training start: log lines, the progress bar and TensorBoard (rank 0)."""

    def __init__(self, cfg: LoggingConfig, log_dir: Path, ctx: DistContext, total_steps: int,
                 samples_per_step: int, start_step: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.is_main = ctx.is_main
        self.tb = TensorBoard(log_dir if ctx.is_main else None, cfg.tensorboard,
                              purge_step=start_step + 1 if start_step else None)
        self.samples_per_step = samples_per_step
        self.window = Throughput(samples_per_step)
        self.bar: tqdm | None = None

    @contextmanager
    def progress(self, step: int) -> Iterator[None]:
        """A progress bar (rank 0) from ``step`` to the last step, closed however the block ends."""
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not self.is_main,
                        desc="train", unit="step", dynamic_ncols=True,
                        # Under torchrun/torchx the output is a pipe: redraw rarely so logs stay readable.
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.window = Throughput(self.samples_per_step)  # the first window starts with the loop
        try:
            yield
        finally:
            self.bar.close()  # ends the bar's line: an error message must start on a line of its own
            self.bar = None

    def after_step(self, state: TrainerState, outputs: dict[str, torch.Tensor], optimizer) -> None:
        """Count the step; every ``log_every_steps`` (and at the last step) log it (collective:
        the scalars are averaged over the ranks); every ``histogram_every_steps`` the histograms."""
        self.window.step()
        if self.bar is not None:
            self.bar.update(1)
        step = state.step
        if step % self.cfg.log_every_steps == 0 or step == self.total_steps:
            self._log_step(state, outputs, optimizer)
        if self.cfg.histogram_every_steps and step % self.cfg.histogram_every_steps == 0:
            for name, values in outputs.items():
                if _is_tensor(values, 1):
                    self.tb.histogram(histogram_tag(name), values, step)

    def _log_step(self, state: TrainerState, outputs: dict[str, torch.Tensor], optimizer) -> None:
        names = ["loss", *(name for name, value in outputs.items() if _is_tensor(value, 0) and name != "loss")]
        # One all-reduce for every scalar of the step (the same names on every rank: one task).
        means = dist_mean(torch.stack([outputs[name].detach().float() for name in names])).tolist()
        scalars = dict(zip(names, means))
        loss, lrs, rate = scalars["loss"], current_learning_rates(optimizer), self.window.rate()
        if self.bar is not None:
            # refresh=False: the bar redraws at its own pace, so piped output is not flooded with bars.
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
        logger.info("step %d/%d loss %.4f lr %s %.0f samples/s", state.step, self.total_steps, loss,
                    " ".join(f"{k}={v:.2e}" for k, v in lrs.items()), rate)
        self.tb.scalars({**scalars, "samples_per_second": rate, "epoch": state.epoch}, state.step, "train/")
        self.tb.scalars(lrs, state.step, "lr/")

    def stopped(self, signal: str, step: int, checkpoint: Path) -> None:
        if self.is_main:
            logger.warning("%s received: stopped at step %d of %d with checkpoint %s; run the same command to "
                           "resume from it", signal, step, self.total_steps, checkpoint)

    def validation(self, metrics: dict[str, float], step: int) -> None:
        self.tb.scalars(metrics, step, "val/")

    def final(self, metrics: dict[str, float], step: int, cfg: TrecConfig) -> None:
        """The test metrics as ``test/`` scalars, and the run's hyperparameters beside its metrics."""
        self.tb.scalars(metrics, step, "test/")
        self.tb.hparams(flat_hparams(cfg), {k: v for k, v in metrics.items() if "/" not in k and k != "users"})

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
