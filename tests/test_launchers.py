"""TorchX components: the AppDef they produce (no cluster needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_components():
    spec = importlib.util.spec_from_file_location("components", REPO / "launchers" / "components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_component_runs_trec_train_under_torchrun():
    app = load_components().train("--config", "c.yaml", "--run-dir", "r", j="2x4", max_restarts=3, gpu=4)
    (role,) = app.roles
    command = role.args[-1]
    assert command.startswith("torchrun ")
    assert "--nnodes 2" in command and "--nproc_per_node 4" in command
    assert command.endswith("-m trec train --config c.yaml --run-dir r")
    assert role.env["PET_MAX_RESTARTS"] == "3"  # torchrun's --max-restarts, read from the environment
    assert role.num_replicas == 2
    assert role.resource.gpu == 4


def test_train_component_help_is_its_docstring():
    doc = load_components().train.__doc__
    assert "max_restarts" in doc and "Args:" in doc
