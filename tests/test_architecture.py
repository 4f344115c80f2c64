"""Where things live: layers import downward only, files stay small, the model contract is the only way in."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_layers_import_downward_only():
    """The [tool.importlinter] layers contract of pyproject.toml (GUIDE.md "Layout") holds."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 broken" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("package", ["trec", "data_pipeline"])
def test_no_module_exceeds_the_line_budget(package):
    long = {str(path.relative_to(REPO)): count for path in sorted((REPO / package).rglob("*.py"))
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most {MAX_LINES} lines each): {long}"


def test_reading_a_config_does_not_import_torchrec():
    """Model packages import torchrec only when a task is built: `trec config show` and `trec data
    prepare` stay fast although the config knows every model's section."""
    code = ("import sys; from trec.models import load_config, model_names; "
            "[load_config(None, [f'model.name={name}']) for name in model_names()]; "
            "print(sorted(model_names()), 'torchrec' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("False"), proc.stdout


def test_an_out_of_tree_model_registers_its_section():
    """register_model adds `model.<name>` (typed, range-checked) and the name to model.name's choices."""
    from trec.config import Range
    from trec.errors import TrecError
    from trec.models import ModelSpec, load_config, model_spec, register_model
    from trec.models import spec as spec_module

    @dataclass
    class ToyConfig:
        width: int = 3
        RANGES = {"width": Range(1)}

    spec = ModelSpec(name="toy_for_test", config=ToyConfig, build_task=lambda model, section, dataset: None,
                     evaluate=lambda task, dataset, request, ctx: {}, default_metric="auc")
    register_model(spec)
    try:
        assert model_spec("toy_for_test") is spec
        cfg = load_config(None, ["model.name=toy_for_test", "model.toy_for_test.width=5"])
        assert cfg.model.section().width == 5 and cfg.model.two_tower.output_dim == 64
        with pytest.raises(TrecError, match="key 'model.toy_for_test.width' must be >= 1, got 0"):
            load_config(None, ["model.toy_for_test.width=0"])
        with pytest.raises(TrecError, match="already registered"):
            register_model(spec)
    finally:  # configs saved by later tests of this process must not carry the toy section
        spec_module._registered.pop("toy_for_test")
        spec_module.config_schema.cache_clear()
