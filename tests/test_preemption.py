"""Preemption: SIGTERM (what Kubernetes sends before it kills a pod) makes a 2-rank run save a checkpoint at
the next step boundary and exit cleanly; the resumed run loses no step.

Kubernetes signals the container's first process, here the torchrun agent, which forwards SIGTERM to
its workers (each in a session of its own) and gives them TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) to exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
import torch
from training import (REPO, STEPS, child_env, kill_job, model_weights, resumed_step, run_command, run_processes,
                      scalar_steps, train_command, wait_for_checkpoint, wait_gone, worker_pids)

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_sigterm_checkpoints_at_a_step_boundary_and_the_resumed_run_loses_no_step(full_run, ml100k_prepared,
                                                                                   tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "preempted.log"
    command = [str(part) for part in train_command(run_dir, ml100k_prepared)]
    with log.open("w") as out:
        agent = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                 start_new_session=True)
        try:
            wait_for_checkpoint(agent, run_dir, "step-5", timeout=600)
            workers = worker_pids(agent.pid, run_dir)
            assert len(workers) == 2, workers
            os.kill(agent.pid, signal.SIGTERM)  # the agent (torch.distributed.run), not the workers
            agent.wait(timeout=120)
            assert not wait_gone(workers, timeout=30), "a worker outlived the agent"
        finally:
            if agent.poll() is None:
                kill_job(agent, run_dir)
    output = log.read_text()
    assert "Sending process" in output and "closing signal SIGTERM" in output  # the agent forwarded it
    stopped = re.search(rf"SIGTERM received: stopped at step (\d+) of {STEPS} with checkpoint", output)
    assert stopped, output[-4000:]
    step = int(stopped.group(1))
    assert 5 <= step < STEPS
    # The command's own last line, printed after the process group was torn down: a clean exit, not a
    # kill by the agent's timeout, and no traceback from trec's code.
    assert f"SIGTERM: stopped at step {step} with a checkpoint" in output
    assert not re.search(r'File ".*/trec/', output), output[-4000:]
    assert run_processes(run_dir) == []

    checkpoint = run_dir / "checkpoints" / f"step-{step}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["complete"] and state["step"] == step and state["samples"] == step * 512 * 2
    assert not (run_dir / "metrics.json").exists()  # stopped, not finished: no final evaluation

    resumed = run_command(train_command(run_dir, ml100k_prepared))
    assert resumed_step(resumed.stderr, run_dir) == step
    assert f"starting at step {step}" in resumed.stderr

    final, reference = run_dir / "checkpoints" / f"step-{STEPS}", full_run / "checkpoints" / f"step-{STEPS}"
    assert json.loads((final / "trainer_state.json").read_text()) == json.loads(
        (reference / "trainer_state.json").read_text())
    ours, theirs = model_weights(final), model_weights(reference)
    for key in theirs:  # a lost, repeated or skipped step would change the weights
        assert torch.equal(ours[key], theirs[key]), key
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == STEPS
    assert scalar_steps(run_dir / "tb", "train/loss") == list(range(5, STEPS + 1, 5))
