"""Helpers shared by the tests that launch real jobs: environment, commands, the ML-100K two-tower run's
settings, killing a run after a checkpoint, and reading checkpoints and TensorBoard back."""

from __future__ import annotations

import os
import re
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
    """Run ``command`` until ``run_dir/checkpoints/CHECKPOINT`` exists, then SIGKILL its workers and itself.

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    would leave the workers training on (and writing checkpoints) beside the resumed run:
    ``kill_job`` kills every process of the job and fails if one outlives it.
    Returns the newest complete checkpoint at the kill (what a resumed run starts from).
    """
    from trec.checkpoint import latest_checkpoint

    proc = subprocess.Popen([str(part) for part in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=child_env(), cwd=REPO)
    try:
        wait_for_checkpoint(proc, run_dir, checkpoint, timeout)
    finally:
        kill_job(proc, run_dir)
    return latest_checkpoint(run_dir / "checkpoints")


# --- processes of a job: torchrun's workers live in sessions of their own ---------------------------


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from one scan of /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so split after the last ")".
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # it ended while we looked
        if state not in ("Z", "X"):  # a zombie is dead: it only waits for its parent to reap it
            parents[int(stat.parent.name)] = int(ppid)
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` (if alive) and all its live descendants, parents before children."""
    parents = _parent_pids()
    tree = [root] if root in parents else []
    for pid in tree:  # grows while iterated: breadth-first
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


def run_processes(run_dir: Path) -> list[int]:
    """Live processes (other than this one) with ``run_dir`` (or a path inside it) on their command line."""
    own = str(run_dir).encode()
    found = []
    for pid in _parent_pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != os.getpid() and any(a == own or a.startswith(own + b"/") for a in argv):
            found.append(pid)
    return found


def worker_pids(launcher_pid: int, run_dir: Path) -> list[int]:
    """The trec workers (not launchers: torchx, torchrun) below ``launcher_pid`` training into ``run_dir``."""
    launchers = (b"torchrun", b"torch.distributed.run", b"torchx")
    in_run = set(run_processes(run_dir))
    workers = []
    for pid in process_tree(launcher_pid)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid in in_run and b"trec" in argv and not any(name in a for a in argv for name in launchers):
            workers.append(pid)
    return workers


def local_rank(pid: int) -> int | None:
    """The LOCAL_RANK torchrun gave worker ``pid`` (None if it has none or has ended)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"LOCAL_RANK=")]
    return ranks[0] if ranks else None


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until none of ``pids`` is alive (zombies count as dead); return those still alive at ``timeout``."""
    deadline = time.time() + timeout
    while True:
        alive = [pid for pid in pids if pid in _parent_pids()]
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.1)


def kill_job(launcher: subprocess.Popen, run_dir: Path, timeout: float = 60) -> None:
    """SIGKILL every process of a job started as ``launcher`` (in a session of its own) and prove none is left.

    A node lost mid-run: the workers die first, then the launcher. The launcher is stopped first so
    that an elastic agent cannot start a replacement group between the scan and the kill; every
    descendant is found through the process tree (torchrun puts each worker in a session of its
    own, out of reach of ``killpg``); anything still running with ``run_dir`` on its command line
    afterwards (a re-parented orphan) fails the test, after being killed too.
    """
    if launcher.poll() is None:
        _signal(launcher.pid, signal.SIGSTOP)
    tree = process_tree(launcher.pid)
    for pid in reversed(tree):  # children before parents
        _signal(pid, signal.SIGKILL)
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    launcher.wait(timeout=timeout)
    survivors = wait_gone(tree, timeout)
    orphans = [pid for pid in run_processes(run_dir) if pid not in tree]
    for pid in survivors + orphans:
        _signal(pid, signal.SIGKILL)
    assert not survivors and not orphans, f"processes of the run outlived the kill: {survivors + orphans}"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def resumed_step(log: str, run_dir: Path) -> int:
    """The step of the named checkpoint a resumed attempt loaded, from trec's log line.

    Fails unless the log says ``checkpoint: resumed from RUN_DIR/checkpoints/step-K (step K, ...)``
    with K > 0: an attempt that silently started over would train to the end all the same.
    """
    checkpoints = re.escape(str(run_dir / "checkpoints"))
    loaded = re.findall(rf"checkpoint: resumed from {checkpoints}/step-(\d+) \(step (\d+),", log)
    assert loaded, f"the attempt resumed from no named checkpoint of {run_dir}:\n{log[-3000:]}"
    steps = {int(named) for named, _ in loaded} | {int(step) for _, step in loaded}
    assert len(steps) == 1 and min(steps) > 0, f"inconsistent or zero resume steps {loaded}"
    return steps.pop()


# A one-process two-tower run of a few steps (the binding and resume-safety tests).
TINY = [
    "data.batch_size=512", "checkpoint.every_steps=0", "logging.projector_items=0", "logging.histogram_every_steps=0",
    "evaluation.max_users=50", "evaluation.ks=[10]",
]


def tiny_train_command(run_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    """``trec train`` (one process) of CONFIG for ``steps`` steps with the TINY overrides, then ``extra``."""
    return trec_command(1, "train", "--config", CONFIG, "--data", data, "--run-dir", run_dir,
                        f"training.max_steps={steps}", *TINY, *extra)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a refused command (exit 2, no traceback)."""
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, (
        f"expected one error line and exit 2, got {proc.returncode}:\n{proc.stderr[-3000:]}")
    return errors[0]


def refusal(capsys, *args) -> str:
    """The one ``error:`` line of ``trec ARGS`` run in this process (trec.cli.main, exit status 2; the whole
    stderr of a real process is checked where that matters: assert_one_line_error). A refusal comes
    before any model or process group is built, so a subprocess (importing torch again) would only add seconds."""
    from trec.cli import main

    status = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # log lines may precede it
    assert status == 2 and len(lines) == 1, err[-3000:]
    return lines[0]
