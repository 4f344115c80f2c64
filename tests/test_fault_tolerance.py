"""Lost workers: the processes really die, nothing of the run is left behind, and training resumes.

torchrun starts each worker in a session of its own, so killing a launcher's process group does
not stop them: these tests SIGKILL the worker processes themselves (found through the process
tree), check that they are gone, and check from the resumed attempt's log that it loaded a named
checkpoint (``checkpoint: resumed from RUN/checkpoints/step-K``, K > 0) rather than starting over.

Two paths: the whole job dies and the user launches it again (torchrun, as ``trec train`` is
run by hand), and one rank dies under TorchX's ``train`` component (local_cwd) with
``--max_restarts 1``, where the elastic agent restarts the group by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training import (
    CONFIG,
    OVERRIDES,
    REPO,
    STEPS,
    child_env,
    kill_job,
    local_rank,
    resumed_step,
    run_command,
    run_processes,
    scalar_steps,
    train_command,
    wait_for_checkpoint,
    wait_gone,
    worker_pids,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SHORT = 20  # steps of the relaunch test: a kill at step 10 and a resume to the end


def _final_step(run_dir: Path, steps: int) -> None:
    state = json.loads((run_dir / "checkpoints" / f"step-{steps}" / "trainer_state.json").read_text())
    assert state["step"] == steps and state["samples"] == steps * 512 * 2
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == steps


def test_killed_job_leaves_no_worker_and_the_relaunch_resumes_from_its_checkpoint(ml100k_prepared, tmp_path):
    from trec.checkpoint import latest_checkpoint

    run_dir = tmp_path / "relaunch"
    command = train_command(run_dir, ml100k_prepared, f"training.max_steps={SHORT}")
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env=child_env(), cwd=REPO)
    try:
        wait_for_checkpoint(job, run_dir, "step-10", timeout=300)
        workers = worker_pids(job.pid, run_dir)
        assert sorted(local_rank(pid) for pid in workers) == [0, 1], workers  # both ranks, not the agent
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log.read_text()[-4000:]}") from None
    finally:
        kill_job(job, run_dir)  # fails if any process of the run outlives the kill
    assert wait_gone(workers, timeout=0) == [] and run_processes(run_dir) == []
    interrupted_at = latest_checkpoint(run_dir / "checkpoints")
    assert interrupted_at is not None and interrupted_at.name != f"step-{SHORT}", "the kill came too late"

    resumed = run_command(command)  # the user launches the same command again
    assert resumed_step(resumed.stderr, run_dir) == int(interrupted_at.name.removeprefix("step-"))
    _final_step(run_dir, SHORT)
    assert run_processes(run_dir) == []


def test_killed_worker_is_restarted_by_the_agent_and_training_finishes(ml100k_prepared, tmp_path):
    run_dir = tmp_path / "ft"
    command = [
        str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
        "./launchers/components.py:train", "-j", "1x2", "--max_restarts", "1", "--",
        "--config", CONFIG, "--data", str(ml100k_prepared), "--run-dir", str(run_dir), *OVERRIDES,
    ]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                           cwd=REPO, start_new_session=True)
    try:
        wait_for_checkpoint(job, run_dir, "step-10", timeout=300)
        victims = [pid for pid in worker_pids(job.pid, run_dir) if local_rank(pid) == 1]
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)  # the fault: one rank dies, its agent lives on
        assert wait_gone(victims, timeout=30) == [], "the killed worker is still running"
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            kill_job(job, run_dir)
    (tmp_path / "job.log").write_text(output)
    assert job.returncode == 0, output[-5000:]
    assert "SUCCEEDED" in output
    # The restarted group loaded a named checkpoint of this run, at or after the one seen before the kill.
    assert 10 <= resumed_step(output, run_dir) < STEPS
    _final_step(run_dir, STEPS)
    # Nothing is counted twice: every logged step appears once in TensorBoard.
    assert scalar_steps(run_dir / "tb", "train/loss") == list(range(5, STEPS + 1, 5))
    assert run_processes(run_dir) == [], "a worker of the run outlived the job"
