"""A small ``kustomize build`` for the tests (no kustomize binary, no network).

It renders the subset of kustomize that k8s/ uses, in kustomize's own order: resources (files and
directories, recursively), ``patchesStrategicMerge`` and ``patches`` (strategic merge by the
patch's kind and name), ``namespace``, ``labels`` (metadata only), ``images``. Any other
kustomization field raises, so the manifests cannot start relying on something rendered here
differently from ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List

import yaml

_SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "patchesStrategicMerge", "patches", "namespace", "labels", "images",
}
# Kinds kustomize knows to be cluster-scoped (it stamps a namespace on every other kind, CRDs
# such as Volcano's Queue included; the API server drops it for cluster-scoped objects).
_CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass",
}
# Lists that a strategic-merge patch merges element by element on this key; every other list
# is replaced (as for tolerations, args, and anything in a custom resource).
_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
    "volumeMounts": "mountPath", "imagePullSecrets": "name",
}


def build(directory: str | Path) -> List[Dict[str, Any]]:
    """Render the kustomization in ``directory`` into a list of resources."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED_FIELDS
    if unknown:
        raise NotImplementedError(f"{directory}/kustomization.yaml: fields not rendered by the tests: {sorted(unknown)}")

    resources: List[Dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs = build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        for doc in docs:
            if any(_same_id(doc, other) for other in resources):
                raise ValueError(f"{path}: {_id(doc)} is defined twice")
            resources.append(doc)

    patches = [_load_one(directory / p) for p in kustomization.get("patchesStrategicMerge", [])]
    for entry in kustomization.get("patches", []):
        if "target" in entry or "options" in entry:
            raise NotImplementedError(f"{directory}: patches with target/options are not rendered by the tests")
        patches.append(_load_one(directory / entry["path"]) if "path" in entry else yaml.safe_load(entry["patch"]))
    for patch in patches:
        matches = [r for r in resources if r["kind"] == patch["kind"] and _name(r) == _name(patch)]
        if len(matches) != 1:
            raise ValueError(f"{directory}: patch for {_id(patch)} matches {len(matches)} resources")
        _merge(matches[0], patch)

    namespace = kustomization.get("namespace")
    if namespace:
        for resource in resources:
            if resource["kind"] not in _CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = namespace
            if resource["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for subject in resource.get("subjects", []):
                    if subject.get("name") == "default":  # kustomize's only rewrite of subjects
                        subject["namespace"] = namespace

    for label in kustomization.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates") or label.get("fields"):
            raise NotImplementedError(f"{directory}: only metadata labels are rendered by the tests")
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])

    for image in kustomization.get("images", []):
        for resource in resources:
            _retag(resource, image)
    return resources


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


def _retag(node: Any, image: Dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, tag = split_image(container.get("image", ""))
                    if name == image["name"]:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
            else:
                _retag(value, image)
    elif isinstance(node, list):
        for item in node:
            _retag(item, image)


def _merge(target: Dict[str, Any], patch: Dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif key in _MERGE_KEYS and isinstance(value, list) and isinstance(target.get(key), list):
            merge_key = _MERGE_KEYS[key]
            for item in value:
                existing = [t for t in target[key] if t.get(merge_key) == item.get(merge_key)]
                if existing:
                    _merge(existing[0], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _load_one(path: Path) -> Dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if len(docs) != 1:
        raise ValueError(f"{path}: a patch file must hold exactly one document, found {len(docs)}")
    return docs[0]


def _name(resource: Dict[str, Any]) -> str:
    return resource.get("metadata", {}).get("name", "")


def _id(resource: Dict[str, Any]) -> str:
    return f"{resource.get('kind')}/{_name(resource)}"


def _same_id(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return _id(a) == _id(b) and a.get("metadata", {}).get("namespace") == b.get("metadata", {}).get("namespace")
