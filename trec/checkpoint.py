"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Layout of a run's checkpoints::

    RUN/checkpoints/step-1200/     .metadata + __R_0.distcp (DCP: sharded model + optimizers)
                                   rng-rank-R.pt  (each rank's torch RNG state, tensors only)
                                   trainer_state.json  (step, epoch, reader position, early stopping)
    RUN/checkpoints/best/          the best validation checkpoint (same layout), if tracked
    RUN/checkpoints/.step-1300.tmp a save in progress (or interrupted): never loaded

Every rank writes its shards into ``.step-K.tmp``; rank 0 writes ``trainer_state.json`` last and
renames the directory to ``step-K`` only after all ranks finished. A checkpoint counts as
complete when it has its final name, DCP's ``.metadata`` and a ``trainer_state.json`` whose
``complete`` flag is set, so a half-written one is never picked. DCP re-shards on load, so a
checkpoint saved on N ranks loads on M.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trec.config import CheckpointConfig
from trec.distributed import DistContext, barrier
from trec.errors import TrecError
from trec.io import atomic_write_json, read_json_object

logger = logging.getLogger("trec")

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST = "best"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs (stored as JSON)."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Epoch of the next batch to train."""
    batch_in_epoch: int = 0
    """Batches of that epoch already trained (the reader resumes right after them)."""
    samples: int = 0
    """Training rows seen by all ranks together."""
    best_metric: float | None = None
    best_step: int = -1
    evals_without_improvement: int = 0
    world_size: int = 1
    complete: bool = True


def is_complete(path: Path) -> bool:
    state = path / STATE_FILE
    if not (path / ".metadata").is_file() or not state.is_file():
        return False
    try:
        return bool(json.loads(state.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete ``step-K`` checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    complete = complete_checkpoints(Path(directory))
    return complete[-1] if complete else None


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**read_json_object(Path(path) / STATE_FILE))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path, ctx: DistContext, seed: int, state: TrainerState) -> None:
    """Restore this rank's RNG; on a different world size, reseed deterministically instead."""
    file = path / f"rng-rank-{ctx.rank}.pt"
    if state.world_size == ctx.world_size and file.is_file():
        saved = torch.load(file, weights_only=True)
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    else:
        torch.manual_seed(seed + 1_000_003 * state.step + ctx.rank)


class Checkpointer:
    """Saves and restores a sharded model, its optimizer and the trainer state under one directory."""

    def __init__(self, directory: Path, cfg: CheckpointConfig, ctx: DistContext) -> None:
        self.directory = Path(directory)
        self.cfg = cfg
        self.ctx = ctx

    def discard_incomplete(self) -> None:
        """Remove saves interrupted by a crash (rank 0, before anyone writes)."""
        if self.ctx.is_main and self.directory.is_dir():
            for child in self.directory.glob(".*.tmp"):
                shutil.rmtree(child, ignore_errors=True)
        barrier()

    def save(self, name: str, model: nn.Module, optimizer, state: TrainerState) -> Path:
        """Collectively write checkpoint ``name`` (e.g. ``step-1200`` or ``best``), atomically."""
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank-{self.ctx.rank}.pt")
        barrier()
        if self.ctx.is_main:
            atomic_write_json(tmp / STATE_FILE, asdict(state) | {"world_size": self.ctx.world_size, "complete": True})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        logger.info("checkpoint: saved %s (step %d)", final, state.step)
        return final

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for old in complete_checkpoints(self.directory)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer, seed: int) -> TrainerState:
        """Restore model, optimizer (re-sharded to this world size), RNG and trainer state."""
        if not is_complete(path):
            raise TrecError(f"{path}: not a complete checkpoint (missing .metadata or {STATE_FILE})")
        optimizer.init_state()  # lazily-created optimizer state must exist to be loaded into
        state_dict = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        dcp.load(state_dict, checkpoint_id=str(path))
        model.load_state_dict(state_dict["model"])
        optimizer.load_state_dict(state_dict["optimizer"])
        state = read_trainer_state(path)
        _restore_rng(path, self.ctx, seed, state)
        logger.info("checkpoint: resumed from %s (step %d, saved on %d ranks)", path, state.step, state.world_size)
        return state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model's (sharded) weights from a checkpoint, e.g. for evaluation or export."""
    path = Path(path)
    if not is_complete(path):
        raise TrecError(f"{path}: not a complete checkpoint (missing .metadata or {STATE_FILE})")
    state_dict = {"model": model.state_dict()}
    dcp.load(state_dict, checkpoint_id=str(path))
    model.load_state_dict(state_dict["model"])


def checkpoint_for_inference(run_dir: Path) -> Path:
    """The checkpoint a finished run is evaluated/exported from: ``best`` if any, else the newest."""
    directory = Path(run_dir) / "checkpoints"
    best = directory / BEST
    if is_complete(best):
        return best
    latest = latest_checkpoint(directory)
    if latest is None:
        raise TrecError(f"{directory}: no complete checkpoint (train the run first: trec train --run-dir {run_dir})")
    return latest
