"""Shared fixtures: real multi-process launches (torchrun, gloo) and the `trec` CLI as a subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from training import REPO, kill_after_checkpoint, run_command, torchrun_command, train_command

ML100K = (REPO.parent / "shared" / "datasets" / "ml-100k").resolve()


@pytest.fixture
def run_trec():
    """Run ``python -m trec ARGS`` and return the CompletedProcess (``check=False`` to expect failure)."""

    def run(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None, cwd=REPO):
        return run_command([sys.executable, "-m", "trec", *args], check, timeout, env, cwd)

    return run


@pytest.fixture
def torchrun():
    """Launch ``torchrun --standalone --nproc_per_node N TARGET ARGS`` (a script path, or ``-m module``)."""

    def run(nproc: int, *target_and_args: str, check: bool = True, timeout: float = 900,
            env: dict | None = None, extra: tuple[str, ...] = ()):
        return run_command([*torchrun_command(nproc), *extra, *target_and_args], check, timeout, env)

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
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    run_command(train_command(run_dir, ml100k_prepared))
    return run_dir


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, ml100k_prepared):
    """The same run, SIGKILLed once its step-10 checkpoint exists, then resumed to the end.

    Returns (run dir, newest complete checkpoint at the kill, log of the resumed attempt).
    """
    run_dir = tmp_path_factory.mktemp("runs") / "resumed"
    interrupted_at = kill_after_checkpoint(train_command(run_dir, ml100k_prepared), run_dir)
    resumed = run_command(train_command(run_dir, ml100k_prepared))
    return run_dir, interrupted_at, resumed.stderr


@pytest.fixture(scope="session")
def serving_export(tmp_path_factory) -> dict:
    """One real bundle for the serving tests (made once per session): a tiny synthetic dataset, a short
    two-tower run and a short DCN run, exported with a flat index and the DCN as ranker. Tests only read
    it (copy it to change it)."""
    from training import TINY, run_command, trec_command

    root = tmp_path_factory.mktemp("serving")
    data, tt, dcn, out = root / "data", root / "tt", root / "dcn", root / "export"
    run_command(trec_command(1, "data", "prepare", "synthetic", "--out", data, "--users", "200", "--items", "120",
                             "--interactions", "6000", "--val-fraction", "0.1", "--quiet"))
    runs = (("configs/movielens_two_tower.yaml", tt, 12), ("configs/movielens_dcn.yaml", dcn, 6))
    for config, run_dir, steps in runs:
        run_command(trec_command(1, "train", "--config", config, "--data", data, "--run-dir", run_dir,
                                 f"training.max_steps={steps}", *TINY))
    run_command(trec_command(1, "export", "--run-dir", tt, "--out", out, "--ranker-run-dir", dcn,
                             "--set", "export.index=flat"))
    return {"export": out, "tt": tt, "root": root}


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory):
    """One real redis-server for the session (tests/redis_server.py: skipped without it, unless CI requires it)."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session):
    """The session's redis-server, running and empty."""
    if redis_session.process is None:
        redis_session.start()
    redis_session.flush()
    return redis_session
