"""trec as an installable package: declared dependencies match the lock, every package and config is in the
wheel, configs and TorchX components resolve by name from an installed trec, and `trec --help` imports no
torch. The install itself, outside the checkout, is `.ci/install-check` (run by `.ci/run`)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from training import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

HEAVY = ("torch", "torchrec", "torchx", "pyarrow", "numpy", "faiss", "fastapi", "pandas")


def _pins(*names: str) -> dict[str, str]:
    pins = {}
    for name in names:
        for line in (REPO / "requirements" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                requirement = Requirement(line.strip())
                (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
                pins[canonicalize_name(requirement.name)] = version
    return pins


@pytest.mark.parametrize("group, files", [
    ("dependencies", ("lock.txt",)),
    ("cpu", ("cpu.txt",)),
    ("gpu", ("gpu.txt",)),
    ("serve", ("lock.txt",)),
    ("dev", ("dev.txt",)),
])
def test_declared_dependencies_are_pinned_in_requirements(group, files):
    """What pyproject.toml declares (the core and each extra) is what requirements/ installs, at versions
    the declaration accepts: the ranges and the lock cannot drift apart."""
    project = PYPROJECT["project"]
    declared = project["dependencies"] if group == "dependencies" else project["optional-dependencies"][group]
    pins = _pins(*files)
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{group}: {requirement.name} is declared but not pinned in requirements/{files[0]}"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{group}: {text} does not accept the pinned {requirement.name}=={pins[name]}"
    assert {"faiss-cpu", "fbgemm-gpu-cpu"} <= {canonicalize_name(Requirement(r).name)
                                               for r in project["optional-dependencies"]["cpu"]}


def test_every_package_and_config_is_in_the_wheel():
    """pyproject lists the packages (configs/ is mapped to trec.configs, which find cannot do): a new package
    folder must be added there, or an installed trec would miss it."""
    from setuptools import find_packages

    tool = PYPROJECT["tool"]["setuptools"]
    found = set(find_packages(str(REPO), include=["trec*", "data_pipeline*", "launchers*"]))
    assert set(tool["packages"]) == found | {"trec.configs"}
    assert tool["package-dir"] == {"trec.configs": "configs"}
    assert tool["package-data"]["trec.configs"] == ["*.yaml"]
    assert (REPO / "configs" / "__init__.py").is_file()  # a regular package: editable installs map it too
    assert PYPROJECT["project"]["license"] == "BSD-3-Clause" and (REPO / "LICENSE").is_file()


def test_configs_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    from trec.config import config_to_dict, packaged_configs
    from trec.errors import TrecError
    from trec.models import load_config

    shipped = {path.stem for path in (REPO / "configs").glob("*.yaml")}
    assert set(packaged_configs()) == shipped
    expected = config_to_dict(load_config(REPO / "configs" / "movielens_two_tower.yaml"))
    monkeypatch.chdir(tmp_path)  # no configs/ here: the installed copies answer
    for name in ("movielens_two_tower", "movielens_two_tower.yaml", "configs/movielens_two_tower.yaml"):
        assert config_to_dict(load_config(name)) == expected, name
    with pytest.raises(TrecError, match=r"config file not found: movielens_nope \(trec ships: movielens_dcn, "):
        load_config("movielens_nope")
    with pytest.raises(TrecError, match=r"config file not found: elsewhere/movielens_two_tower.yaml$"):
        load_config("elsewhere/movielens_two_tower.yaml")  # a path with a folder is never looked up by name
    (tmp_path / "movielens_two_tower.yaml").write_text("training:\n  max_steps: 7\n")
    assert load_config("movielens_two_tower.yaml").training.max_steps == 7  # an existing file always wins


def test_torchx_finds_the_installed_components_by_name():
    """`torchx run trec.train` works from any directory (entry points), and TorchX's builtins stay available."""
    from torchx.specs.finder import get_component, get_components

    groups = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="torchx.components")}
    assert groups == {"trec": "launchers.components", "_builtins": "torchx.components"}
    names = set(get_components())
    assert {"trec.train", "trec.export", "trec.evaluate", "trec.tensorboard", "dist.ddp", "utils.echo"} <= names
    assert not {name for name in names if name.startswith("trec._")}  # helpers are not components
    app = get_component("trec.train").fn("--config", "movielens_two_tower", j="1x2")
    assert app.roles[0].args[1].startswith("python -m trec.launch ")
    assert app.roles[0].num_replicas == 1 and "--nproc_per_node 2" in app.roles[0].args[1]


def test_help_imports_no_torch():
    """`trec --help` (and `import trec`) stay instant: the commands import torch, torchrec, pyarrow, faiss
    inside their run functions, the benchmarks' arguments load with their benchmark (trec/commands/bench.py)."""
    code = ("import sys\nimport trec, trec.cli\n"
            "try:\n    trec.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for argv in (['data', 'prepare', '--help'], ['serve', '--help'], ['bench', '--help']):\n"
            "    try:\n        trec.cli.main(argv)\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "usage: trec" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_benchmark_gets_its_arguments_when_chosen(capsys):
    from trec.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["bench", "quality", "--help"])
    assert "--methods" in capsys.readouterr().out  # defined in trec/bench/quality.py
