"""Multi-node in the suite: two torchrun "nodes" of one rank each on this host, launched by TorchX's
local_cwd scheduler with ``-j 2x1`` and a c10d rendezvous, train, checkpoint, resume from the
checkpoint and export, end to end.

local_cwd runs one torchrun agent per replica (node); they meet through the c10d rendezvous on
``localhost:PORT`` (the first agent hosts its store, the second connects). trec's components put
it on TorchX's default port 29500; the components of tests/workers/multinode.py wrap them and move
it to a free port, so that the test cannot collide with another job on the host.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
from training import CONFIG, resumed_step, run_command, trec_command

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TORCHX = str(Path(sys.executable).parent / "torchx")
COMPONENTS = "tests/workers/multinode.py"
TRAIN = ["data.batch_size=64", "checkpoint.every_steps=3", "logging.log_every_steps=3", "logging.projector_items=0",
         "logging.histogram_every_steps=0", "evaluation.max_users=50", "evaluation.ks=[10]"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _two_nodes(component: str, logs: Path, *args: str) -> str:
    """Run ``component`` of COMPONENTS on two local nodes (``-j 2x1``); its output, after checking that
    TorchX ran two replicas (a torchrun agent each) and the job succeeded."""
    proc = run_command([TORCHX, "run", "-s", "local_cwd", "-cfg", f"log_dir={logs}", f"{COMPONENTS}:{component}",
                        "-j", "2x1", "--rdzv_port", str(_free_port()), "--", *args], timeout=300)
    output = proc.stdout + proc.stderr
    assert "Job finished: SUCCEEDED" in output, output[-4000:]
    app = re.search(r"local_cwd://torchx/(\S+)", output).group(1)
    assert sorted(path.name for path in (logs / "torchx" / app / "trec").iterdir()) == ["0", "1"]  # two nodes
    assert "world_size=2" in output, output[-4000:]
    return output


def _state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())


def test_two_nodes_train_checkpoint_resume_and_export(tmp_path):
    data, run_dir, out, logs = tmp_path / "data", tmp_path / "run", tmp_path / "export", tmp_path / "logs"
    run_command(trec_command(1, "data", "prepare", "synthetic", "--out", data, "--users", "200", "--items", "100",
                             "--interactions", "5000", "--val-fraction", "0.1", "--quiet"))
    args = ["--config", CONFIG, "--data", str(data), "--run-dir", str(run_dir), *TRAIN]

    _two_nodes("train", logs, *args, "training.max_steps=6")
    first = _state(run_dir, 6)
    assert (first["step"], first["world_size"], first["samples"], first["complete"]) == (6, 2, 6 * 64 * 2, True)

    # The same run with a longer schedule: it must load step-6, not start over.
    resumed = _two_nodes("train", logs, *args, "training.max_steps=9")
    assert resumed_step(resumed, run_dir) == 6
    assert "step 9/9" in resumed and "step 3/9" not in resumed
    assert (_state(run_dir, 9)["step"], _state(run_dir, 9)["samples"]) == (9, 9 * 64 * 2)

    _two_nodes("export", logs, "--run-dir", str(run_dir), "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint_name"] == "step-9"
    assert manifest["num_vectors"] == 100 and manifest["num_shards"] == 2
    assert manifest["embeddings"]["items"]["rows"] == [50, 50]  # each node's rank encoded its half
    assert all((out / name).is_file() for name in manifest["shard_files"])
