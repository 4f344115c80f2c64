"""TorchX components: the AppDefs they build and the Volcano Jobs `torchx run --dryrun` prints (no cluster)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).parent / "torchx")
CPU_IMAGE = "ghcr.io/trec-dev/trec:0.1.0-cpu"
CUDA_IMAGE = "ghcr.io/trec-dev/trec:0.1.0-cuda"
RUNS = "type=volume,src=trec-runs,dst=/runs"
DATA = "type=volume,src=trec-datasets,dst=/data,readonly"


def load_components():
    spec = importlib.util.spec_from_file_location("components", REPO / "launchers" / "components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchx(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TREC_IMAGE", "TREC_CUDA_IMAGE", "TORCHXCONFIG")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([TORCHX, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, f"torchx {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def dryrun_k8s(component: str, *args: str) -> dict:
    """The Volcano Job that ``torchx run -s kubernetes`` would submit (parsed from the dry run)."""
    proc = _torchx("run", "--workspace", "", "--dryrun", "-s", "kubernetes", "-cfg", "queue=trec,namespace=trec",
                   f"./launchers/components.py:{component}", *args)
    _, _, request = proc.stdout.partition("=== SCHEDULER REQUEST ===")
    assert request.strip(), proc.stdout
    return yaml.safe_load(request)


def _container(task: dict) -> dict:
    (container,) = task["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container["env"]}


def _mounts(task: dict) -> dict:
    """mountPath -> (claimName, readOnly) for the PVC-backed volumes of a task."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in task["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    return {m["mountPath"]: (claims[m["name"]], m.get("readOnly", False))
            for m in _container(task)["volumeMounts"] if m["name"] in claims}


# --- AppDefs (in process) ------------------------------------------------------------------------


def test_train_component_runs_trec_train_under_torchrun_through_trec_launch():
    app = load_components().train("--config", "c.yaml", "--run-dir", "r", j="2x4", max_restarts=3, gpu=4)
    (role,) = app.roles
    command = role.args[-1]
    # torchrun's arguments, run by trec.launch so a user error ends in one line
    assert command.startswith("python -m trec.launch --rdzv_backend c10d ")
    assert "--nnodes 2" in command and "--nproc_per_node 4" in command
    assert command.endswith("-m trec train --config c.yaml --run-dir r")
    assert role.env["PET_MAX_RESTARTS"] == "3"  # torchrun's --max-restarts, read from the environment
    assert role.num_replicas == 2
    assert role.resource.gpu == 4


@pytest.mark.parametrize("name", ["prepare", "train", "export", "evaluate", "tensorboard"])
def test_every_parameter_is_typed_and_documented(name):
    fn = getattr(load_components(), name)
    documented = set(re.findall(r"^\s{8}(\w+):", fn.__doc__.split("Args:", 1)[1], flags=re.M))
    params = inspect.signature(fn).parameters
    assert documented == set(params), f"{name}: documented {documented ^ set(params)} mismatch"
    for param in params.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) has no type"
        assert not isinstance(param.annotation, str), "string annotations break TorchX's argument decoding"
    assert inspect.signature(fn).return_annotation.__name__ == "AppDef"


@pytest.mark.parametrize("name", ["export", "evaluate"])
def test_trec_jobs_share_one_signature(name):
    components = load_components()
    assert list(inspect.signature(getattr(components, name)).parameters)[:-1] == \
        list(inspect.signature(components.train).parameters)[:-1]  # all but the default name


def test_gpu_job_gets_nccl_settings_and_cpu_job_none():
    components = load_components()
    (gpu_role,) = components.train("--config", "c.yaml", j="1x4", gpu=4, cpu=16).roles
    assert gpu_role.env["NCCL_DEBUG"] == "WARN"
    assert gpu_role.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert gpu_role.env["OMP_NUM_THREADS"] == "4"  # 16 CPUs shared by 4 ranks
    assert gpu_role.image == components.DEFAULT_CUDA_IMAGE
    (cpu_role,) = components.train("--config", "c.yaml", j="1x2").roles
    assert not any(k.startswith(("NCCL", "TORCH_NCCL")) for k in cpu_role.env)
    assert cpu_role.image == components.DEFAULT_IMAGE and cpu_role.resource.gpu == 0


def test_user_env_and_image_win_over_defaults():
    (role,) = load_components().export(gpu=2, image="my/img:1", env={"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "3"}).roles
    assert role.image == "my/img:1"
    assert role.env["NCCL_DEBUG"] == "INFO" and role.env["OMP_NUM_THREADS"] == "3"


def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(ValueError, match="ranks per node"):
        load_components().train(j="1x4", gpu=2)
    with pytest.raises(ValueError, match="max_restarts"):
        load_components().evaluate(max_restarts=-1)


def test_named_resource_wins_over_cpu_gpu_mem():
    (role,) = load_components().train(j="1x4", h="aws_g5.12xlarge", gpu=0).roles
    assert role.resource.gpu == 4 and "NCCL_DEBUG" in role.env


# --- torchx run --dryrun -s kubernetes -----------------------------------------------------------


def test_train_dryrun_is_a_volcano_gang_of_gpu_nodes():
    job = dryrun_k8s(
        "train", "-j", "2x2", "--gpu", "2", "--cpu", "8", "--memMB", "32000", "--max_restarts", "3",
        "--mounts", f"{DATA},{RUNS}", "--env", "LOGLEVEL=INFO,TREC_TAG=nightly",
        "--", "--config", "configs/movielens_two_tower.yaml", "--data", "/data/ml100k", "--run-dir", "/runs/tt",
        "training.steps=100",
    )
    assert job["apiVersion"] == "batch.volcano.sh/v1alpha1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "trec"
    assert len(spec["tasks"]) == 2  # one task per node
    for node, task in enumerate(spec["tasks"]):
        assert task["replicas"] == 1 and task["minAvailable"] == 1  # Volcano gang: both nodes or none
        container = _container(task)
        assert container["image"] == CUDA_IMAGE
        command = container["command"]
        assert command[:2] == ["bash", "-c"]
        assert re.match(r"python -m trec.launch --rdzv_backend c10d --rdzv_endpoint \S+:29500 .*--nnodes 2 --nproc_per_node 2 ",
                        command[2])
        assert command[2].endswith(
            "-m trec train --config configs/movielens_two_tower.yaml --data /data/ml100k --run-dir /runs/tt"
            " training.steps=100")
        resources = container["resources"]
        assert resources["limits"] == {"cpu": "8000m", "memory": "32000M", "nvidia.com/gpu": "2"}
        assert resources["requests"]["nvidia.com/gpu"] == "2"
        assert set(resources["requests"]) == {"cpu", "memory", "nvidia.com/gpu"}
        assert _mounts(task) == {"/data": ("trec-datasets", True), "/runs": ("trec-runs", False)}
        env = _env(container)
        assert env["PET_MAX_RESTARTS"] == "3"
        assert env["LOGLEVEL"] == "INFO" and env["TREC_TAG"] == "nightly"
        assert env["NCCL_DEBUG"] == "WARN" and env["OMP_NUM_THREADS"] == "4"
        # The pods run as the manifests' service account (.torchxconfig), which mounts no token.
        assert task["template"]["spec"]["serviceAccountName"] == "trec-runner"
        assert task["template"]["spec"]["restartPolicy"] == "Never"
    rank0 = _env(_container(spec["tasks"][0]))
    assert rank0["TORCHX_RANK0_HOST"] == "localhost"
    assert "${TORCHX_RANK0_HOST:=localhost}" not in _container(spec["tasks"][1])["command"][2]  # peers use VC_*


def test_train_dryrun_on_cpu_has_no_gpu_and_the_cpu_image():
    job = dryrun_k8s("train", "-j", "1x2", "--", "--config", "c.yaml", "--data", "/data/d", "--run-dir", "/runs/r")
    (task,) = job["spec"]["tasks"]
    container = _container(task)
    assert container["image"] == CPU_IMAGE
    assert container["resources"]["limits"] == {"cpu": "2000m", "memory": "8192M"}
    assert container["resources"]["requests"] == {"cpu": "1900m", "memory": "7168M"}
    env = _env(container)
    assert env["PET_MAX_RESTARTS"] == "0" and env["OMP_NUM_THREADS"] == "1"
    assert not any(k.startswith(("NCCL", "TORCH_NCCL")) for k in env)
    assert "--nnodes 1 --nproc_per_node 2" in container["command"][2]


@pytest.mark.parametrize("component,args,tail", [
    ("export", ["--run-dir", "/runs/tt", "--out", "/exports/tt", "--users"],
     "-m trec export --run-dir /runs/tt --out /exports/tt --users"),
    ("evaluate", ["--run-dir", "/runs/tt", "--index", "/exports/tt", "--ranker-run-dir", "/runs/dcn", "eval.k=10"],
     "-m trec evaluate --run-dir /runs/tt --index /exports/tt --ranker-run-dir /runs/dcn eval.k=10"),
])
def test_export_and_evaluate_dryrun(component, args, tail):
    job = dryrun_k8s(
        component, "-j", "2x1", "--memMB", "16000", "--max_restarts", "1", "--image", "registry.local/trec:dev",
        "--mounts", f"{RUNS},readonly,type=volume,src=trec-exports,dst=/exports", "--", *args,
    )
    assert job["spec"]["schedulerName"] == "volcano" and job["spec"]["queue"] == "trec"
    assert len(job["spec"]["tasks"]) == 2
    for task in job["spec"]["tasks"]:
        container = _container(task)
        assert container["image"] == "registry.local/trec:dev"
        assert "--nnodes 2 --nproc_per_node 1" in container["command"][2]
        assert container["command"][2].endswith(tail)
        assert container["resources"]["limits"]["memory"] == "16000M"
        assert _mounts(task) == {"/runs": ("trec-runs", True), "/exports": ("trec-exports", False)}
        assert _env(container)["PET_MAX_RESTARTS"] == "1"


def test_tensorboard_dryrun_is_one_server_on_the_runs_volume():
    job = dryrun_k8s("tensorboard", "--run_dir", "/runs/tt", "--mounts", f"{RUNS},readonly")
    (task,) = job["spec"]["tasks"]
    container = _container(task)
    assert container["image"] == CPU_IMAGE
    command = container["command"]
    assert command[:3] == ["python", "-m", "torchx.apps.utils.process_monitor"]  # builtin metrics.tensorboard
    server = command[command.index("--") + 1:]
    assert server[0] == "tensorboard" and "--bind_all" in server
    assert server[server.index("--logdir") + 1] == "/runs/tt/tb" and server[server.index("--port") + 1] == "6006"
    assert container["ports"] == [{"containerPort": 6006, "name": "http"}]
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert _mounts(task) == {"/runs": ("trec-runs", True)}


# --- restricted pods (launchers/scheduler.py, registered as TorchX's `kubernetes`) ----------------


def _own_pod_security() -> tuple[dict, dict]:
    """The pod and container securityContext of the project's own pods (k8s/ TensorBoard Deployment)."""
    from kubetools import kustomize, pod_specs

    (deployment,) = [r for r in kustomize(REPO / "k8s" / "base") if r["metadata"]["name"] == "trec-tensorboard"
                     and r["kind"] == "Deployment"]
    (pod,) = pod_specs(deployment)
    return pod["securityContext"], pod["containers"][0]["securityContext"]


@pytest.mark.parametrize("component,args", [
    ("train", ["-j", "2x2", "--gpu", "2", "--mounts", f"{DATA},{RUNS}", "--", "--config", "c.yaml"]),
    ("export", ["--mounts", f"{RUNS},readonly", "--", "--run-dir", "/runs/tt", "--out", "/runs/x"]),
    ("evaluate", ["--", "--run-dir", "/runs/tt"]),
    ("tensorboard", ["--run_dir", "/runs/tt", "--mounts", f"{RUNS},readonly"]),
])
def test_torchx_pods_get_the_restricted_security_context_of_our_own_pods(component, args):
    job = dryrun_k8s(component, *args)
    pod_sc, container_sc = _own_pod_security()
    for task in job["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert spec["securityContext"] == pod_sc  # non-root 10001, fsGroup, seccomp RuntimeDefault
        assert spec["automountServiceAccountToken"] is False
        container = _container(task)
        assert container["securityContext"] == container_sc  # no escalation, drop ALL, read-only root
        assert "privileged" not in container["securityContext"]
        # A read-only root needs a writable /tmp and a HOME there (torchrun, Python, TensorBoard).
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])
        assert _env(container)["HOME"] == "/tmp"
        assert not [v for v in spec["volumes"] if "hostPath" in v]


def test_read_only_root_is_a_per_job_choice_and_host_paths_are_refused():
    proc = _torchx("run", "--workspace", "", "--dryrun", "-s", "kubernetes",
                   "-cfg", "queue=trec,read_only_root_filesystem=False", "./launchers/components.py:evaluate")
    job = yaml.safe_load(proc.stdout.partition("=== SCHEDULER REQUEST ===")[2])
    (task,) = job["spec"]["tasks"]
    container = _container(task)
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}  # the rest stays restricted
    assert task["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "/tmp" not in {m["mountPath"] for m in container["volumeMounts"]}

    env = {k: v for k, v in os.environ.items() if k not in ("TREC_IMAGE", "TREC_CUDA_IMAGE", "TORCHXCONFIG")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    refused = subprocess.run(
        [TORCHX, "run", "--workspace", "", "--dryrun", "-s", "kubernetes", "-cfg", "queue=trec",
         "./launchers/components.py:train", "--mounts", "type=bind,src=/var/run,dst=/host"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert refused.returncode != 0
    assert "host path mounts ['/var/run'] are not allowed" in refused.stdout + refused.stderr


# --- the local scheduler and --help ---------------------------------------------------------------


def test_local_cwd_dryrun_runs_torchrun_from_the_working_tree():
    proc = _torchx("run", "-s", "local_cwd", "--dryrun", "./launchers/components.py:train", "-j", "1x2",
                   "--", "--config", "configs/movielens_two_tower.yaml", "--data", "d", "--run-dir", "r")
    out = re.sub(r"['\"]\s*\n\s*['\"]", "", proc.stdout)  # undo the pretty-printer's string wrapping
    assert "python -m trec.launch --rdzv_backend c10d" in out and "--nnodes 1 --nproc_per_node 2" in out
    assert "-m trec train --config configs/movielens_two_tower.yaml --data d --run-dir r" in out
    assert f"'cwd': '{REPO}'" in out
    assert "runs/torchx-logs" in out  # [local_cwd] log_dir from .torchxconfig


def test_help_lists_the_documented_options():
    out = _torchx("run", "-s", "local_cwd", "./launchers/components.py:train", "--help").stdout
    for option in ("--image", "-j", "--cpu", "--gpu", "--memMB", "--h", "--env", "--max_restarts", "--mounts",
                   "--name"):
        assert re.search(rf"(^|\s){re.escape(option)} ", out), f"--help lacks {option}"
    assert "Train a trec model" in out and "torchrun restarts" in out


def _readme_kubernetes_runs() -> list[str]:
    """Every `torchx run -s kubernetes ...` command README's "Run on Kubernetes" section shows."""
    section = (REPO / "README.md").read_text().split("## Run on Kubernetes", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands.append(re.sub(r"\s+#.*$", "", line).strip())
    commands += re.findall(r"`(torchx run [^`]+)`", section)
    return [c for c in commands if c.startswith("torchx run ") and "-s kubernetes" in c and "..." not in c]


def test_readme_kubernetes_commands_dry_run():
    commands = _readme_kubernetes_runs()
    components = {re.search(r"components\.py:(\w+)", c).group(1) for c in commands}
    assert components == {"prepare", "train", "export", "evaluate", "tensorboard"}
    for command in commands:
        args = shlex.split(command)[2:]  # after `torchx run`
        proc = _torchx("run", "--dryrun", *args)
        job = yaml.safe_load(proc.stdout.partition("=== SCHEDULER REQUEST ===")[2])
        assert job["spec"]["queue"] == "trec" and job["spec"]["tasks"], command
