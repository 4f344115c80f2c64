"""A lost worker: torchrun restarts the group (max_restarts) and training resumes from its checkpoint.

The job is launched exactly as a user would, through the TorchX `train` component on the
local_cwd scheduler; one rank is SIGKILLed mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training import CONFIG, OVERRIDES, REPO, STEPS, child_env, scalar_steps, wait_for_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def worker_pids(run_dir: Path, local_rank: int) -> list[int]:
    """PIDs of trec workers (not the torchrun agent) training into ``run_dir`` as ``local_rank``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_worker = b"trec" in argv and str(run_dir).encode() in argv and not any(b"torchrun" in a for a in argv)
        if is_worker and f"LOCAL_RANK={local_rank}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_killed_worker_is_restarted_and_training_finishes(ml100k_prepared, tmp_path):
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
        victims = worker_pids(run_dir, local_rank=1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    (tmp_path / "job.log").write_text(output)
    assert job.returncode == 0, output[-5000:]
    assert "SUCCEEDED" in output
    assert "resumed from" in output  # the restarted group picked up the newest checkpoint

    state = json.loads((run_dir / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["samples"] == STEPS * 512 * 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == STEPS
    # Nothing is counted twice: every logged step appears once in TensorBoard.
    assert scalar_steps(run_dir / "tb", "train/loss") == list(range(5, STEPS + 1, 5))
