"""Shared fixtures: real multi-process launches (torchrun, gloo) and the `trec` CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML100K = (REPO.parent / "shared" / "datasets" / "ml-100k").resolve()


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # Child processes must find torchrun/trec of this interpreter's environment.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _check(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, proc.args))}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def run_trec():
    """Run ``python -m trec ARGS`` and return the CompletedProcess (``check=False`` to expect failure)."""

    def run(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None, cwd=REPO):
        proc = subprocess.run(
            [sys.executable, "-m", "trec", *map(str, args)],
            capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=cwd,
        )
        return _check(proc, check)

    return run


@pytest.fixture
def torchrun():
    """Launch ``torchrun --standalone --nproc_per_node N TARGET ARGS`` (a script path, or ``-m module``)."""

    def run(nproc: int, *target_and_args: str, check: bool = True, timeout: float = 900,
            env: dict | None = None, extra: tuple[str, ...] = ()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *extra, *map(str, target_and_args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=REPO)
        return _check(proc, check)

    return run


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.fail(f"MovieLens 100K not found at {ML100K} (CI provides ../shared beside the clone)")
    return ML100K


@pytest.fixture(scope="session")
def ml100k_prepared(ml100k, tmp_path_factory) -> Path:
    """ML-100K prepared with the benchmark protocol (stratified 0.25, seed 42, val 0.1), once per session."""
    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.movielens import MovieLensSource
    from trec.config import PrepareConfig

    out = tmp_path_factory.mktemp("prepared") / "ml100k"
    options = PrepareConfig(test_fraction=0.25, val_fraction=0.1, seed=42)
    prepare_dataset(MovieLensSource(str(ml100k)), out, options)
    return out


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, ml100k_prepared) -> Path:
    """An uninterrupted 2-rank two-tower run of training.STEPS steps on ML-100K."""
    from training import train_command

    run_dir = tmp_path_factory.mktemp("runs") / "full"
    proc = subprocess.run(train_command(run_dir, ml100k_prepared), capture_output=True, text=True, timeout=900,
                          env=_env())
    _check(proc, True)
    return run_dir


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, ml100k_prepared):
    """The same run, SIGKILLed once its step-10 checkpoint exists, then resumed to the end.

    Returns (run dir, newest complete checkpoint at the kill, log of the resumed attempt).
    """
    from training import kill_after_checkpoint, train_command

    run_dir = tmp_path_factory.mktemp("runs") / "resumed"
    interrupted_at = kill_after_checkpoint(train_command(run_dir, ml100k_prepared), run_dir, env=_env())
    resumed = subprocess.run(train_command(run_dir, ml100k_prepared), capture_output=True, text=True, timeout=900,
                             env=_env())
    _check(resumed, True)
    return run_dir, interrupted_at, resumed.stderr
