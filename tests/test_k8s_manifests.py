"""k8s/: every manifest parses and carries what a cluster needs; both overlays render with `kubectl kustomize`
(no cluster; tests/kubetools.py)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import yaml

from kubetools import containers, kustomize, pod_specs, split_image

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
CPU_IMAGE = "ghcr.io/trec-dev/trec:0.1.0-cpu"
CUDA_IMAGE = "ghcr.io/trec-dev/trec:0.1.0-cuda"
REDIS_IMAGE = "redis:7.2-alpine"  # the serving pods' online store (k8s/base/redis.yaml), in every overlay
TREC_UID = 10001  # the USER of docker/Dockerfile*
PART_OF = {"app.kubernetes.io/part-of": "trec"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomizations() -> dict[Path, dict]:
    return {p: yaml.safe_load(p.read_text()) for p in sorted(K8S.rglob("kustomization.yaml"))}


def _patch_files() -> set[Path]:
    files = set()
    for path, kustomization in _kustomizations().items():
        files |= {(path.parent / p).resolve() for p in kustomization.get("patchesStrategicMerge", [])}
        files |= {(path.parent / p["path"]).resolve() for p in kustomization.get("patches", []) if "path" in p}
    return files


def _resource_files() -> list[Path]:
    patches = _patch_files()
    return [p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml" and p.resolve() not in patches]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def _find(resources: list[dict], kind: str, name: str) -> dict:
    (match,) = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return match


def _torchx_cfg() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(REPO / ".torchxconfig")
    return parser["kubernetes"]


# --- every file ---------------------------------------------------------------------------------


def test_every_yaml_parses_and_names_its_kind():
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert files, "k8s/ holds no manifests"
    for path in files:
        docs = _docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_base_and_overlays_exist():
    assert (K8S / "base" / "kustomization.yaml").is_file()
    for name in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
        assert "../../base" in kustomization["resources"]


def test_every_manifest_is_used_by_a_kustomization():
    listed = set()
    for path, kustomization in _kustomizations().items():
        listed |= {(path.parent / r).resolve() for r in kustomization.get("resources", []) if (path.parent / r).is_file()}
    orphans = [p for p in _resource_files() if p.resolve() not in listed]
    assert not orphans, f"manifests no kustomization lists (kubectl apply -k would skip them): {orphans}"


def test_every_resource_carries_the_common_labels():
    for path in _resource_files():
        for doc in _docs(path):
            labels = doc["metadata"].get("labels", {})
            where = f"{path.relative_to(REPO)}: {doc['kind']}/{doc['metadata']['name']}"
            assert labels.get("app.kubernetes.io/part-of") == "trec", where
            assert labels.get("app.kubernetes.io/name"), where
            assert labels.get("app.kubernetes.io/component"), where


def test_every_pod_has_resources_and_a_restricted_security_context():
    pods = 0
    for path in _resource_files():
        for doc in _docs(path):
            where = f"{path.relative_to(REPO)}: {doc['kind']}/{doc['metadata']['name']}"
            for pod in pod_specs(doc):
                pods += 1
                pod_sc = pod.get("securityContext", {})
                assert pod.get("serviceAccountName") == "trec-runner", where
                assert pod.get("automountServiceAccountToken") is False, where
                template_labels = (doc["spec"].get("template") or {}).get("metadata", {}).get("labels", {})
                assert template_labels.get("app.kubernetes.io/part-of") == "trec", f"{where}: pod template labels"
                tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
                for container in pod.get("containers", []) + pod.get("initContainers", []):
                    c = f"{where} container {container['name']}"
                    resources = container.get("resources", {})
                    for section in ("requests", "limits"):
                        assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{c}: resources.{section}"
                    sc = {**pod_sc, **container.get("securityContext", {})}
                    assert sc.get("runAsNonRoot") is True, c
                    assert sc.get("runAsUser") == TREC_UID, c
                    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", c
                    assert container["securityContext"].get("allowPrivilegeEscalation") is False, c
                    assert container["securityContext"].get("capabilities", {}).get("drop") == ["ALL"], c
                    assert container["securityContext"].get("readOnlyRootFilesystem") is True, c
                    # A read-only root needs a writable /tmp (Python, TensorBoard, torch caches).
                    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                    assert tmp and tmp[0]["name"] in tmp_volumes, f"{c}: /tmp must be an emptyDir"
    assert pods >= 4  # TensorBoard, data loader, export Job, trec serve


# --- what is in the base -------------------------------------------------------------------------


def test_base_has_every_piece_the_issue_asks_for():
    base = kustomize(K8S / "base")
    kinds = {(r["apiVersion"], r["kind"], r["metadata"]["name"]) for r in base}
    assert ("scheduling.volcano.sh/v1beta1", "Queue", "trec") in kinds
    assert ("v1", "Namespace", "trec") in kinds
    assert ("v1", "ServiceAccount", "trec-runner") in kinds
    for pvc in ("trec-datasets", "trec-runs", "trec-exports"):
        assert ("v1", "PersistentVolumeClaim", pvc) in kinds
    assert ("apps/v1", "Deployment", "trec-tensorboard") in kinds
    assert ("v1", "Service", "trec-tensorboard") in kinds
    assert ("batch/v1", "Job", "trec-export") in kinds
    assert ("apps/v1", "Deployment", "trec-serve") in kinds
    assert ("v1", "Service", "trec-serve") in kinds
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "trec-serve") in kinds
    assert ("networking.k8s.io/v1", "NetworkPolicy", "trec-serve") in kinds


def test_service_account_has_least_privilege():
    base = kustomize(K8S / "base")
    assert _find(base, "ServiceAccount", "trec-runner").get("automountServiceAccountToken") is False
    assert not _find(base, "Role", "trec-runner").get("rules")  # trec pods call no Kubernetes API
    binding = _find(base, "RoleBinding", "trec-runner")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trec-runner"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trec-runner", "namespace": "trec"}]
    assert not [r for r in base if r["kind"] in ("ClusterRole", "ClusterRoleBinding")]  # namespace-scoped only

    rules = _find(base, "Role", "trec-submitter")["rules"]
    grants = {(group, resource, name, verb) for r in rules for group in r["apiGroups"] for resource in r["resources"]
              for name in r.get("resourceNames", ["*"]) for verb in r["verbs"]}
    # Exactly what submitting and following jobs needs (each verb's reason is a comment in rbac.yaml):
    # no update, no Secrets/ConfigMaps/PVCs, watch on pods only, and named objects where a name is known.
    assert grants == {
        ("batch.volcano.sh", "jobs", "*", "create"), ("batch.volcano.sh", "jobs", "*", "list"),
        ("batch.volcano.sh", "jobs", "*", "delete"), ("batch.volcano.sh", "jobs/status", "*", "get"),
        ("", "pods/log", "*", "get"), ("", "pods", "*", "get"), ("", "pods", "*", "list"),
        ("", "pods", "*", "watch"),
        ("", "services", "trec-tensorboard", "get"), ("", "services", "trec-serve", "get"),
        ("", "pods/portforward", "*", "create"),
        ("", "pods/exec", "*", "create"),
        ("apps", "deployments", "trec-data-loader", "get"), ("apps", "deployments/scale", "trec-data-loader", "patch"),
        ("batch", "jobs", "*", "create"), ("batch", "jobs", "trec-export", "get"),
        ("batch", "jobs", "trec-export", "patch"), ("batch", "jobs", "trec-export", "delete"),
    }
    for rule in rules:  # resourceNames cannot restrict create or list: a rule mixing them would be broader
        if "resourceNames" in rule:
            assert not {"create", "list", "watch", "deletecollection"} & set(rule["verbs"]), rule


def test_every_submitter_verb_says_why():
    (text,) = [d for d in (K8S / "base" / "rbac.yaml").read_text().split("\n---\n")
               if yaml.safe_load(d)["kind"] == "Role" and yaml.safe_load(d)["metadata"]["name"] == "trec-submitter"]
    verbs = re.findall(r"^( +)verbs:(.*)\n((?:\1  - .*\n)*)", text, flags=re.M)
    assert len(verbs) == len(yaml.safe_load(text)["rules"]) and all(not inline.strip() for _, inline, _ in verbs)
    for _, _, items in verbs:
        assert items, "rbac.yaml: verbs as a block list, one per line with its reason"
        for line in items.splitlines():
            assert re.fullmatch(r"\s*- \w+  # \S.{10,}", line), f"rbac.yaml: a verb without its reason: {line!r}"


def test_network_policy_denies_ingress_but_to_job_peers_and_tensorboard_port():
    base = kustomize(K8S / "base")
    policies = {r["metadata"]["name"]: r["spec"] for r in base if r["kind"] == "NetworkPolicy"}
    deny = policies["trec-default-deny-ingress"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}  # every pod: no ingress unless allowed below
    torchx = {"app.kubernetes.io/managed-by": "torchx.pytorch.org"}  # on every pod TorchX submits
    peers = policies["trec-torchx-job-peers"]
    assert peers["podSelector"] == {"matchLabels": torchx}
    assert peers["ingress"] == [{"from": [{"podSelector": {"matchLabels": torchx}}]}]  # rendezvous, gloo/NCCL

    service = _find(base, "Service", "trec-tensorboard")
    tensorboard = policies["trec-tensorboard"]
    assert tensorboard["podSelector"] == {"matchLabels": service["spec"]["selector"]}
    (rule,) = tensorboard["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # this namespace only (no namespaceSelector, no ipBlock)
    assert rule["ports"] == [{"protocol": "TCP", "port": service["spec"]["ports"][0]["targetPort"]}]
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"]
        for ingress in spec.get("ingress", []):
            assert all("ipBlock" not in peer and "namespaceSelector" not in peer for peer in ingress["from"])
    assert _find(base, "Namespace", "trec")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_tensorboard_is_reachable_only_through_its_cluster_ip_service(rendered):
    for name, resources in rendered.items():
        kinds = {r["kind"] for r in resources}
        assert not kinds & {"Ingress", "Route", "HTTPRoute", "Gateway"}, name
        for resource in resources:
            where = f"{name}: {resource['kind']}/{resource['metadata']['name']}"
            if resource["kind"] == "Service":
                spec = resource["spec"]
                assert spec.get("type", "ClusterIP") == "ClusterIP", where
                assert not spec.get("externalIPs") and not spec.get("loadBalancerIP"), where
                assert all("nodePort" not in port for port in spec["ports"]), where
            for pod in pod_specs(resource):
                assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
                for container in pod["containers"]:
                    assert all("hostPort" not in port for port in container.get("ports", [])), where


def test_tensorboard_reads_the_runs_volume_read_only():
    base = kustomize(K8S / "base")
    deployment = _find(base, "Deployment", "trec-tensorboard")
    (pod,) = pod_specs(deployment)
    (container,) = pod["containers"]
    assert container["command"] == ["tensorboard"]
    assert container["args"][:2] == ["--logdir", "/runs"] and "--bind_all" in container["args"]
    runs = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "trec-runs")
    assert runs["persistentVolumeClaim"]["readOnly"] is True
    mount = next(m for m in container["volumeMounts"] if m["name"] == runs["name"])
    assert mount == {"name": runs["name"], "mountPath": "/runs", "readOnly": True}
    service = _find(base, "Service", "trec-tensorboard")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["port"] == 6006


def test_export_job_template_exports_a_run_into_the_exports_volume():
    job = _find(kustomize(K8S / "base"), "Job", "trec-export")
    assert job["spec"]["suspend"] is True  # a template: `kubectl apply -k` must not start an export
    (pod,) = pod_specs(job)
    (container,) = pod["containers"]
    assert container["args"][0] == "export"  # the image's entrypoint is `trec`
    env = {e["name"]: e["value"] for e in container["env"]}
    args = " ".join(container["args"]).replace("$(TREC_RUN_DIR)", env["TREC_RUN_DIR"])
    args = args.replace("$(TREC_EXPORT_DIR)", env["TREC_EXPORT_DIR"])
    assert re.fullmatch(r"export --run-dir /runs/\S+ --out /exports/\S+", args)
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert claims[mounts["/runs"]["name"]]["claimName"] == "trec-runs" and mounts["/runs"]["readOnly"] is True
    assert claims[mounts["/exports"]["name"]]["claimName"] == "trec-exports"
    assert not mounts["/exports"].get("readOnly")
    assert pod["restartPolicy"] == "Never"


# --- online serving (trec serve) ------------------------------------------------------------------

SERVE = "trec-serve"


def _serve_container(resources: list[dict], name: str = SERVE) -> tuple[dict, dict, dict]:
    """(Deployment, pod spec, its one container) of the Deployment ``name``."""
    deployment = _find(resources, "Deployment", name)
    (pod,) = pod_specs(deployment)
    (container,) = pod["containers"]
    return deployment, pod, container


def _pod_matches(selector: dict, deployment: dict) -> bool:
    return selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_serving_deployment_serves_an_export_read_only(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        deployment, pod, container = _serve_container(resources)
        assert container["image"] == CPU_IMAGE, name  # serving needs no GPU, in any overlay
        env = {e["name"]: e.get("value") for e in container["env"]}
        args = " ".join(container["args"]).replace("$(TREC_EXPORT_DIR)", env["TREC_EXPORT_DIR"])
        match = re.fullmatch(r"serve /exports/[\w.-]+ --host 0\.0\.0\.0 --port 8000 "
                             r"--workers (\d+) --threads (\d+) --store redis://:\$\(REDIS_PASSWORD\)@[\w.-]+:\d+/\d+"
                             r" --events /data/events", args)
        assert match, f"{name}: {args}"
        # In a pod the CPU limit is a quota the process cannot see: threads are set, within the limit.
        workers, threads = map(int, match.groups())
        assert 1 <= workers * threads <= float(container["resources"]["limits"]["cpu"]), name
        assert env["HOME"] == "/tmp"  # a read-only root: torch and Python caches go to the emptyDir
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        # The volume the export Job writes, read-only both on the claim and the mount; the datasets volume,
        # writable, for the feedback events the next `trec data prepare` reads (--events /data/events).
        assert claims == {mounts["/exports"]["name"]: {"claimName": "trec-exports", "readOnly": True},
                          mounts["/data"]["name"]: {"claimName": "trec-datasets"}}, name
        assert mounts["/exports"]["readOnly"] is True and not mounts["/data"].get("readOnly"), name
        assert set(mounts) == {"/exports", "/data", "/tmp"}, name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()


def test_serving_args_parse_with_trec_serve():
    """The container's command line is one `trec serve` accepts and does not refuse (a renamed flag, or
    --workers 2 without a shared store, fails here, not in a pod)."""
    from trec.cli import build_parser
    from trec.commands.serve import _check_args

    _, _, container = _serve_container(kustomize(K8S / "base"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    args = build_parser().parse_args([a.replace("$(TREC_EXPORT_DIR)", env["TREC_EXPORT_DIR"])
                                      for a in container["args"]])
    _check_args(args)
    assert args.workers == 1 or args.store.startswith("redis://")  # memory is per process (and per pod)
    assert (args.command, args.bundle, args.host, args.port) == ("serve", env["TREC_EXPORT_DIR"], "0.0.0.0", 8000)
    assert args.workers * args.threads <= float(container["resources"]["limits"]["cpu"])


def test_serving_probes_ask_ready_and_health_on_the_named_port(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        _, _, container = _serve_container(resources)
        assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}], name
        probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        paths = {kind: (probe["httpGet"]["path"], probe["httpGet"]["port"]) for kind, probe in probes.items()}
        assert paths == {"startupProbe": ("/ready", "http"), "readinessProbe": ("/ready", "http"),
                         "livenessProbe": ("/health", "http")}, name
        # Loading and warming the bundle gets its own budget; liveness only starts after it.
        startup = probes["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, name
        assert "initialDelaySeconds" not in probes["livenessProbe"], name


def test_serving_pod_is_restricted_with_guaranteed_resources(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        _, pod, container = _serve_container(resources)
        sc = {**pod["securityContext"], **container["securityContext"]}
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == TREC_UID, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert not sc.get("privileged"), name
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "trec-runner", name
        (tmp,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp), name
        requested = container["resources"]
        assert requested["requests"] == requested["limits"], name  # Guaranteed QoS: steady latency
        assert {"cpu", "memory"} <= set(requested["requests"]), name


def test_serving_service_selects_the_deployment_pods_on_port_8000(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        deployment, _, container = _serve_container(resources)
        service = _find(resources, "Service", SERVE)
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert _pod_matches(service["spec"]["selector"], deployment), name
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"], name
        (port,) = service["spec"]["ports"]
        assert port == {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}, name
        assert port["targetPort"] in {p["name"] for p in container["ports"]}, name
        # Nothing else in the namespace selects these pods by accident.
        others = [r for r in resources if r["kind"] == "Service" and r["metadata"]["name"] != SERVE]
        assert not [s for s in others if _pod_matches(s["spec"]["selector"], deployment)], name


def test_serving_autoscales_on_cpu_and_survives_drains(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        deployment, _, container = _serve_container(resources)
        hpa = _find(resources, "HorizontalPodAutoscaler", SERVE)
        assert hpa["apiVersion"] == "autoscaling/v2", name
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVE}, name
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"], name
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu", name
        target = metric["resource"]["target"]
        assert target["type"] == "Utilization" and 0 < target["averageUtilization"] <= 100, name
        assert "cpu" in container["resources"]["requests"], name  # Utilization is measured against it
        assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"], name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        pdb = _find(resources, "PodDisruptionBudget", SERVE)
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"], name
        assert pdb["spec"]["maxUnavailable"] == 1, name


def test_serving_port_is_open_to_the_namespace_only_and_scraped_at_metrics():
    base = kustomize(K8S / "base")
    deployment, _, container = _serve_container(base)
    service = _find(base, "Service", SERVE)
    policy = _find(base, "NetworkPolicy", SERVE)["spec"]
    assert policy["podSelector"] == {"matchLabels": service["spec"]["selector"]}
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # this namespace only (no namespaceSelector, no ipBlock)
    assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port["containerPort"]),
                           "prometheus.io/path": "/metrics"}


def test_readme_shows_what_the_serving_deployment_runs():
    section = (REPO / "README.md").read_text().split("## Run on Kubernetes", 1)[1].split("\n## ", 1)[0]
    _, _, container = _serve_container(kustomize(K8S / "base"))
    env = {e["name"]: e.get("value") for e in container["env"]}
    command = " ".join(["trec", *container["args"]]).replace("$(TREC_EXPORT_DIR)", env["TREC_EXPORT_DIR"])
    assert command in " ".join(section.split()), command
    service = _find(kustomize(K8S / "base"), "Service", SERVE)
    port = service["spec"]["ports"][0]["port"]
    assert f"kubectl -n trec port-forward svc/{SERVE} {port}:{port}" in section


def test_serving_port_matches_the_image():
    exposed = re.findall(r"^EXPOSE\s+(\d+)", (REPO / "docker" / "Dockerfile").read_text(), flags=re.M)
    _, _, container = _serve_container(kustomize(K8S / "base"))
    assert [str(p["containerPort"]) for p in container["ports"]] == exposed


# --- the online store the serving pods share (Redis) ----------------------------------------------

REDIS = "trec-redis"


def _redis_container(resources: list[dict]) -> tuple[dict, dict, dict]:
    return _serve_container(resources, REDIS)


def _memory_bytes(quantity: str) -> int:
    """``1Gi`` / ``768mb`` (Kubernetes or Redis spelling) -> bytes."""
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", quantity).groups()
    scale = {"": 1, "ki": 2**10, "mi": 2**20, "gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}[unit.lower()]
    return int(number) * scale


def test_redis_deployment_service_and_policy_render_in_every_overlay(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        deployment, _, container = _redis_container(resources)
        service = _find(resources, "Service", REDIS)
        policy = _find(resources, "NetworkPolicy", REDIS)
        assert deployment["spec"]["replicas"] == 1, name  # two Redis pods behind one Service: two stores
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name
        assert container["image"] == REDIS_IMAGE, name
        _, tag = split_image(container["image"])
        assert tag and tag != "latest", name  # pinned: a rollout does not pull a new major version
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"], name
        assert _pod_matches(service["spec"]["selector"], deployment), name
        (port,) = service["spec"]["ports"]
        assert port["port"] == 6379 and port["protocol"] == "TCP", name
        target = next(p for p in container["ports"] if p["name"] == port["targetPort"])
        assert target["containerPort"] == 6379, name
        assert policy["spec"]["podSelector"] == {"matchLabels": service["spec"]["selector"]}, name


def test_redis_pod_is_restricted_with_guaranteed_resources_and_probes(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        _, pod, container = _redis_container(resources)
        sc = {**pod["securityContext"], **container["securityContext"]}
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), name
        assert pod["automountServiceAccountToken"] is False, name
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/data") in empty_dirs, name  # a read-only root: Redis's working directory
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], name  # online state only
        requested = container["resources"]
        assert requested["requests"] == requested["limits"], name
        assert {"cpu", "memory"} <= set(requested["limits"]), name
        args = container["args"]
        # No persistence (the event log and the bundles are the durable records), and a memory cap
        # below the container's limit, with an eviction policy instead of refused writes.
        assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no", name
        assert _memory_bytes(args[args.index("--maxmemory") + 1]) < _memory_bytes(requested["limits"]["memory"]), name
        # Only keys with a TTL (histories, served lists) may go: experiment counters have none.
        assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru", name
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert probe.get("exec", {}).get("command") == ["redis-cli", "ping"] or \
                probe.get("tcpSocket", {}).get("port") in ("redis", 6379), f"{name}: {kind}"


def test_serving_store_url_points_at_the_redis_service(rendered):
    from urllib.parse import urlsplit

    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        _, _, container = _serve_container(resources)
        args = container["args"]
        url = urlsplit(args[args.index("--store") + 1])
        service = _find(resources, "Service", REDIS)
        namespace = service["metadata"].get("namespace", "trec")
        assert url.scheme == "redis", name
        assert url.hostname in (REDIS, f"{REDIS}.{namespace}", f"{REDIS}.{namespace}.svc",
                                f"{REDIS}.{namespace}.svc.cluster.local"), name
        assert url.port == service["spec"]["ports"][0]["port"], name
        assert url.path.strip("/").isdigit(), name


def test_only_the_serving_pods_reach_redis(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        serving, _, _ = _serve_container(resources)
        redis, _, container = _redis_container(resources)
        service = _find(resources, "Service", REDIS)
        policy = _find(resources, "NetworkPolicy", REDIS)["spec"]
        assert policy["policyTypes"] == ["Ingress"], name
        (rule,) = policy["ingress"]
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}, name  # no namespaceSelector, no ipBlock
        assert peer["podSelector"] == {"matchLabels": serving["spec"]["selector"]["matchLabels"]}, name
        assert _pod_matches(peer["podSelector"]["matchLabels"], serving), name
        assert not _pod_matches(peer["podSelector"]["matchLabels"], redis), name
        port = service["spec"]["ports"][0]["targetPort"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}], name
        assert port in {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
        # No other policy lets anything else in (the default deny selects every pod and admits nothing).
        for other in resources:
            if other["kind"] == "NetworkPolicy" and other["metadata"]["name"] != REDIS:
                selector = other["spec"]["podSelector"].get("matchLabels", {})
                if _pod_matches(selector, redis):
                    assert not other["spec"].get("ingress"), f"{name}: {other['metadata']['name']}"
        # Were the serving pods' egress ever limited, Redis's port must stay open to them.
        for other in resources:
            if other["kind"] == "NetworkPolicy" and "Egress" in other["spec"].get("policyTypes", []) \
                    and _pod_matches(other["spec"]["podSelector"].get("matchLabels", {}), serving):
                egress = other["spec"].get("egress", [])
                assert any(p.get("port") in (6379, port) for e in egress for p in e.get("ports", [])), name


def test_serving_admin_token_comes_from_an_optional_secret(rendered):
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        _, _, container = _serve_container(resources)
        (token,) = [e for e in container["env"] if e["name"] == "TREC_ADMIN_TOKEN"]
        assert "value" not in token, name  # never a literal in the manifests
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"], name
        assert ref["optional"] is True, name  # without the Secret pods start and /admin/* answers 403
        assert not [r for r in resources if r["kind"] == "Secret"], name  # the administrator creates it


# --- overlays -------------------------------------------------------------------------------------


def test_overlays_render_into_the_trec_namespace_with_common_labels(rendered):
    for name, resources in rendered.items():
        for resource in resources:
            where = f"{name}: {resource['kind']}/{resource['metadata']['name']}"
            if resource["kind"] != "Namespace":
                assert resource["metadata"].get("namespace") == "trec", where
            labels = resource["metadata"]["labels"]
            assert labels.items() >= {**PART_OF, "trec.dev/flavor": name}.items(), where


def test_cpu_overlay_has_no_gpu_and_only_the_cpu_image(rendered):
    resources = rendered["cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(resources)
    images = {c["image"] for r in resources for c in containers(r)}
    assert images == {CPU_IMAGE, REDIS_IMAGE}
    for resource in resources:
        for pod in pod_specs(resource):
            assert not pod.get("tolerations") and not pod.get("nodeSelector")


def test_gpu_overlay_runs_export_on_a_gpu_with_the_cuda_image(rendered):
    resources = rendered["gpu"]
    job = _find(resources, "Job", "trec-export")
    (pod,) = pod_specs(job)
    (container,) = pod["containers"]
    assert container["image"] == CUDA_IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])  # the patch merged, not replaced
    assert container["args"][0] == "export" and len(container["volumeMounts"]) == 5
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Nothing else asks for a GPU, and the rest keeps the small CPU image.
    for resource in resources:
        for c in containers(resource):
            if resource is not job:
                assert c["image"] in (CPU_IMAGE, REDIS_IMAGE) and "nvidia.com/gpu" not in str(c["resources"])
    queue = _find(resources, "Queue", "trec")
    assert queue["spec"]["capability"]["nvidia.com/gpu"] and queue["spec"]["capability"]["cpu"]
    assert "$patch" not in yaml.safe_dump_all(resources)


def test_overlays_differ_only_where_they_should(rendered):
    ids = {name: sorted((r["kind"], r["metadata"]["name"]) for r in rs) for name, rs in rendered.items()}
    assert ids["cpu"] == ids["gpu"]


# --- agreement with TorchX and the images ---------------------------------------------------------


def test_torchxconfig_matches_the_manifests():
    cfg = _torchx_cfg()
    base = kustomize(K8S / "base")
    assert _find(base, "Queue", cfg["queue"])
    assert _find(base, "Namespace", cfg["namespace"])
    assert _find(base, "ServiceAccount", cfg["service_account"])
    repos = {split_image(c["image"])[0] for r in kustomize(K8S / "overlays" / "cpu") for c in containers(r)
             if c["image"] != REDIS_IMAGE}
    assert repos == {cfg["image_repo"]}


def test_readme_mounts_name_existing_claims():
    claims = {r["metadata"]["name"] for r in kustomize(K8S / "base") if r["kind"] == "PersistentVolumeClaim"}
    section = (REPO / "README.md").read_text().split("## Run on Kubernetes", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"type=volume,src=([\w-]+)", section))
    assert named and named <= claims, f"README mounts {named - claims}, not PVCs in k8s/"


def _scalars_as_str(node):
    if isinstance(node, dict):
        return {k: _scalars_as_str(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_scalars_as_str(v) for v in node]
    return str(node)


def test_builtin_kinds_have_only_known_fields(rendered):
    """Round-trip through the Kubernetes client's typed models: a misspelt or misplaced field
    (``readOnlyRootFileSystem``, ``resources`` on the pod) is dropped on the way and shows up here."""
    from kubernetes.client import ApiClient

    import kubernetes.client as models

    api = ApiClient()
    checked = 0
    for name, resources in rendered.items():
        for resource in resources:
            model = f"{resource['apiVersion'].rsplit('/', 1)[-1].capitalize()}{resource['kind']}"  # V2Horizontal...
            if resource["kind"] == "Queue":
                assert set(resource["spec"]) <= {"weight", "reclaimable", "capability", "guarantee", "deserved"}
                continue
            assert hasattr(models, model), f"{name}: no {model} model for {resource['kind']}"
            typed = api._ApiClient__deserialize(resource, model)  # the client's own response decoder
            round_trip = api.sanitize_for_serialization(typed)
            assert _scalars_as_str(round_trip) == _scalars_as_str(resource), f"{name}: {resource['kind']}/" \
                f"{resource['metadata']['name']} has fields the {model} schema does not know"
            checked += 1
    assert checked >= 20


def _secret_env(container: dict) -> dict[str, tuple[str, str, bool]]:
    """env name → (Secret, key, optional) of the container's variables read from Secrets."""
    return {e["name"]: (ref["name"], ref["key"], ref.get("optional", False))
            for e in container.get("env", []) if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}


def test_redis_requires_the_password_the_serving_pods_use(rendered):
    """One Secret key: Redis starts only with it (an empty --requirepass would be no password), the probes
    authenticate through REDISCLI_AUTH, and the serving pods put the same key in their store URL."""
    for name, resources in {"base": kustomize(K8S / "base"), **rendered}.items():
        _, _, redis = _redis_container(resources)
        _, _, serve = _serve_container(resources)
        password = ("trec-redis", "password", False)
        assert _secret_env(redis) == {"REDIS_PASSWORD": password, "REDISCLI_AUTH": password}, name
        assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)", name
        assert _secret_env(serve)["REDIS_PASSWORD"] == password, name
        store = serve["args"][serve["args"].index("--store") + 1]
        assert store.startswith("redis://:$(REDIS_PASSWORD)@trec-redis:"), name
        for probe in ("readinessProbe", "livenessProbe"):
            assert "-a" not in redis[probe]["exec"]["command"], name  # the password stays off command lines
