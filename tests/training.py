"""Helpers shared by the end-to-end training tests (a 2-rank gloo run of the ML-100K two-tower)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

CONFIG = "configs/movielens_two_tower.yaml"
STEPS = 40
OVERRIDES = [
    f"training.max_steps={STEPS}",
    "training.eval_every_steps=20",
    "checkpoint.every_steps=5",
    "checkpoint.keep_last=2",
    "logging.log_every_steps=5",
    "logging.histogram_every_steps=20",
    "logging.projector_items=50",
    "data.batch_size=512",
]


def train_command(run_dir: Path, data: Path, *extra: str, nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "trec", "train", "--config", CONFIG, "--data", str(data), "--run-dir", str(run_dir),
            *OVERRIDES, *extra]


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, loaded whole in this process."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        return _load_state_dict_from_keys(checkpoint_id=str(checkpoint))["model"]


def scalar_steps(tb_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def trec_command(nproc: int, *args: str) -> list[str]:
    """``python -m trec ARGS`` under torchrun with ``nproc`` ranks (1: a plain process)."""
    if nproc == 1:
        return [sys.executable, "-m", "trec", *map(str, args)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "trec", *map(str, args)]


def kill_after_checkpoint(command: list[str], run_dir: Path, checkpoint: str = "step-10", env: dict | None = None,
                          timeout: float = 600) -> Path | None:
    """Run ``command`` until ``run_dir/checkpoints/CHECKPOINT`` exists, then SIGKILL its whole process group.

    Returns the newest complete checkpoint at the kill (what a resumed run starts from).
    """
    import os
    import signal
    import subprocess
    import time

    from trec.checkpoint import latest_checkpoint

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / checkpoint).is_dir():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoints"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return latest_checkpoint(run_dir / "checkpoints")
