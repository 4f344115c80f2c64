"""Helpers shared by the tests that launch real jobs: environment, commands, the ML-100K two-tower run's
settings, killing a run after a checkpoint, and reading checkpoints and TensorBoard back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

REPO = Path(__file__).resolve().parents[1]
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


def child_env(extra: dict | None = None) -> dict:
    """The environment of a launched job: this checkout importable, this venv's torchrun/trec on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def run_command(command: list, check: bool = True, timeout: float = 900, env: dict | None = None,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``command`` to the end; with ``check`` a non-zero exit fails the test with both outputs' tails."""
    proc = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout,
                          env=child_env(env), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(proc.args)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def train_command(run_dir: Path, data: Path, *extra: str, nproc: int = 2) -> list[str]:
    """The two-tower run of this module's CONFIG and OVERRIDES under torchrun with ``nproc`` ranks."""
    return [*torchrun_command(nproc), "-m", "trec", "train", "--config", CONFIG, "--data", str(data),
            "--run-dir", str(run_dir), *OVERRIDES, *extra]


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
    launcher = [sys.executable] if nproc == 1 else torchrun_command(nproc)
    return [*launcher, "-m", "trec", *map(str, args)]


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, checkpoint: str, timeout: float) -> None:
    """Poll until ``run_dir/checkpoints/CHECKPOINT`` exists; fail if ``proc`` ends or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / checkpoint).is_dir():
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoints"
        time.sleep(0.05)


def kill_after_checkpoint(command: list[str], run_dir: Path, checkpoint: str = "step-10",
                          timeout: float = 600) -> Path | None:
    """Run ``command`` until ``run_dir/checkpoints/CHECKPOINT`` exists, then SIGKILL its whole process group.

    Returns the newest complete checkpoint at the kill (what a resumed run starts from).
    """
    from trec.checkpoint import latest_checkpoint

    proc = subprocess.Popen([str(part) for part in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=child_env(), cwd=REPO)
    wait_for_checkpoint(proc, run_dir, checkpoint, timeout)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return latest_checkpoint(run_dir / "checkpoints")
