"""TorchX components for trec jobs: ``torchx run -s SCHEDULER ./launchers/components.py:NAME`` from a checkout,
or ``torchx run -s SCHEDULER trec.NAME`` anywhere trec is installed (``torchx.components`` entry points).

Each component is a typed function whose docstring is its ``--help``. ``prepare`` runs
``python -m trec data prepare ...`` as one process; ``train``, ``export`` and ``evaluate`` run
``python -m trec COMMAND ...`` on every rank under torchrun (via TorchX's builtin ``dist.ddp``);
``tensorboard`` reuses TorchX's builtin ``metrics.tensorboard``. The same component
launches on this workstation (``-s local_cwd``, which runs the working tree and ignores ``image``)
and on Kubernetes with Volcano (``-s kubernetes``, images from docker/, volumes from k8s/), where
every pod runs restricted (non-root, no capabilities, read-only image: launchers/scheduler.py).

No ``from __future__ import annotations`` here: TorchX decodes ``--env``/``--mounts`` from the
real annotation objects, and string annotations make it fail with ``ValueError: Unknown``.
"""

import os
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist, metrics
from torchx.components.dist import parse_nnodes
from torchx.components.structured_arg import StructuredNameArgument

# Images built from docker/Dockerfile and docker/Dockerfile.cuda (the k8s/ manifests and the
# README use the same names). Kubernetes runs them; local_cwd runs the working tree instead.
DEFAULT_IMAGE = os.environ.get("TREC_IMAGE", "ghcr.io/trec-dev/trec:0.1.0-cpu")
DEFAULT_CUDA_IMAGE = os.environ.get("TREC_CUDA_IMAGE", "ghcr.io/trec-dev/trec:0.1.0-cuda")

# Only GPU jobs get these: trec picks nccl when it sees GPUs and gloo otherwise, so a CPU job
# needs no backend setting at all.
_NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    # A dead peer makes pending NCCL collectives raise instead of hanging until the watchdog
    # timeout, so torchrun notices the failure and can restart the group (max_restarts).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


def _trec_job(
    command: List[str],
    name: str,
    image: str,
    j: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    env: Optional[Dict[str, str]],
    max_restarts: int,
    mounts: Optional[List[str]],
) -> "specs.AppDef":  # quoted: TorchX lists every function annotated `-> specs.AppDef` as a component
    """``python -m trec COMMAND...`` on every rank of a torchrun job (the one builder of trec jobs).

    torchrun reads ``--max-restarts`` from ``PET_MAX_RESTARTS``: when a worker dies the elastic agent
    restarts the whole group (up to that many times) and trec resumes from its newest checkpoint.
    """
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    _, _, nproc_per_node, _ = parse_nnodes(j)
    resource = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h)  # h wins, as in dist.ddp
    if resource.gpu > 0 and nproc_per_node > resource.gpu:
        raise ValueError(
            f"-j {j} starts {nproc_per_node} ranks per node but each node has {resource.gpu} GPU(s);"
            f" use -j NxM with M <= {resource.gpu} or ask for more GPUs (--gpu)"
        )

    job_env: Dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    # torchrun would pin every rank to 1 thread; give each rank its share of the node's CPUs.
    if resource.cpu > 0:
        job_env["OMP_NUM_THREADS"] = str(max(1, int(resource.cpu) // nproc_per_node))
    if resource.gpu > 0:
        job_env.update(_NCCL_ENV)
    job_env.update(env or {})  # the caller's values win over every default above
    job_env["PET_MAX_RESTARTS"] = str(max_restarts)
    app = dist.ddp(
        *command,
        m="trec",
        name=name,
        image=image or (DEFAULT_CUDA_IMAGE if resource.gpu > 0 else DEFAULT_IMAGE),
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        h=h,
        env=job_env,
        mounts=mounts,
    )
    # torchrun's own arguments, but through trec.launch: a user error in the workers ends the job
    # in their one `error: ...` line instead of the launcher's forty-line traceback.
    role = app.roles[0]
    shell, script = role.args
    if not script.startswith("torchrun "):
        raise RuntimeError(f"torchx's dist.ddp changed its command line: {script[:80]}")
    role.args = [shell, "python -m trec.launch " + script[len("torchrun "):]]
    return app


def prepare(
    *args: str,
    image: str = "",
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    name: str = "trec/prepare",
) -> specs.AppDef:
    """Prepare a dataset for training (validate, map IDs, split, Parquet shards + manifest): ``trec data prepare ARGS``.

    One process (no torchrun, no GPU). Example: ``torchx run -s local_cwd ./launchers/components.py:prepare --
    movielens --source ../shared/datasets/ml-100k --out data/ml100k``

    Args:
        args: arguments of ``trec data prepare``: ``SOURCE --out DIR [--source PATH] [--overwrite] [--set=KEY=VALUE ...]
            [KEY=VALUE ...]``, SOURCE one of ``movielens``, ``parquet``, ``csv``, ``synthetic`` (repeat
            ``--set=KEY=VALUE`` with the ``=``: TorchX refuses a repeated option word)
        image: container image (Kubernetes); empty picks the trec CPU image; local_cwd ignores it and runs
            the working tree
        cpu: CPUs; Arrow's thread pool gets as many threads
        memMB: memory in MB
        h: a registered TorchX named resource, e.g. ``aws_m5.2xlarge`` (overrides cpu and memMB)
        env: extra environment variables, e.g. ``LOGLEVEL=INFO``
        max_retries: times the job is retried after a failure; ``--out`` appears only once complete (written
            beside it, then renamed), so a retry starts clean
        mounts: volumes, e.g. ``type=volume,src=trec-datasets,dst=/data`` (the raw files and the prepared
            dataset on the datasets PVC, writable; ``type=bind``, a host path, is local only)
        name: job name (``{experiment}/{run}``)
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    argname = StructuredNameArgument.parse_from(name=name, m="trec")  # as dist.ddp names train jobs
    resource = specs.resource(cpu=cpu, gpu=0, memMB=memMB, h=h)
    job_env = {"PYTHONUNBUFFERED": "1", "TORCHX_TRACKING_EXPERIMENT_NAME": argname.experiment_name}
    # Arrow sizes its thread pool from OMP_NUM_THREADS, else from the node's cores, which in a pod
    # are not the CPUs its limit grants.
    if resource.cpu > 0:
        job_env["OMP_NUM_THREADS"] = str(max(1, int(resource.cpu)))
    job_env.update(env or {})  # the caller's values win
    role = specs.Role(
        name="trec",  # the role name of the torchrun jobs too: `torchx log APP_HANDLE/trec`
        image=image or DEFAULT_IMAGE,
        entrypoint="python",
        args=["-m", "trec", "data", "prepare", *args],
        num_replicas=1,
        resource=resource,
        env=job_env,
        max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    return specs.AppDef(name=argname.run_name, roles=[role])


def train(
    *args: str,
    image: str = "",
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_restarts: int = 0,
    mounts: Optional[List[str]] = None,
    name: str = "trec/train",
) -> specs.AppDef:
    """Train a trec model (two-tower or DCN-v2) on sharded embeddings: ``trec train ARGS`` on every rank.

    Example: ``torchx run -s local_cwd ./launchers/components.py:train -j 1x2 --
    --config configs/movielens_two_tower.yaml --data data/ml100k --run-dir runs/tt``

    Args:
        args: arguments of ``trec train``: ``--config FILE --data DIR --run-dir DIR [--set=KEY=VALUE ...]
            [KEY=VALUE ...]`` (TorchX refuses an option word given twice, so repeat ``--set=KEY=VALUE``
            with the ``=``, or give trailing ``KEY=VALUE`` pairs)
        image: container image (Kubernetes); empty picks the trec CPU image, or the CUDA image
            when the job asks for GPUs; local_cwd ignores it and runs the working tree
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``2x2``; with GPUs, nproc_per_node at most the GPUs per node
        cpu: CPUs per node (replica); each rank gets ``cpu / nproc_per_node`` OpenMP threads
        gpu: GPUs per node (replica); 0 trains on CPU with gloo, otherwise trec uses NCCL
        memMB: host memory per node in MB
        h: a registered TorchX named resource, e.g. ``aws_g5.12xlarge`` (overrides cpu, gpu and memMB)
        env: extra environment variables, e.g. ``LOGLEVEL=INFO,NCCL_DEBUG=INFO``
        max_restarts: times torchrun restarts the worker group after a failure; training resumes
            from the newest complete checkpoint in the run directory
        mounts: volumes, e.g. ``type=volume,src=trec-datasets,dst=/data,readonly,type=volume,src=trec-runs,dst=/runs``
            (``type=volume`` binds a PersistentVolumeClaim on Kubernetes; ``type=bind``, a host path, is local only)
        name: job name (``{experiment}/{run}``)
    """
    return _trec_job(["train", *args], name, image, j, cpu, gpu, memMB, h, env, max_restarts, mounts)


def export(
    *args: str,
    image: str = "",
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_restarts: int = 0,
    mounts: Optional[List[str]] = None,
    name: str = "trec/export",
) -> specs.AppDef:
    """Export item (or user) embeddings of a trained run into a sharded FAISS index: ``trec export ARGS`` on every rank.

    Each rank encodes its slice of the catalog. Example: ``torchx run -s local_cwd
    ./launchers/components.py:export -j 1x2 -- --run-dir runs/tt --out exports/tt``

    Args:
        args: arguments of ``trec export``: ``--run-dir RUN --out DIR [--users] [--set=KEY=VALUE ...]
            [KEY=VALUE ...]`` (repeat ``--set=KEY=VALUE`` with the ``=``: TorchX refuses a repeated option word)
        image: container image (Kubernetes); empty picks the trec CPU image, or the CUDA image
            when the job asks for GPUs; local_cwd ignores it and runs the working tree
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2``; with GPUs, nproc_per_node at most the GPUs per node
        cpu: CPUs per node (replica); each rank gets ``cpu / nproc_per_node`` OpenMP threads
        gpu: GPUs per node (replica); 0 encodes on CPU with gloo, otherwise trec uses NCCL
        memMB: host memory per node in MB
        h: a registered TorchX named resource, e.g. ``aws_g5.12xlarge`` (overrides cpu, gpu and memMB)
        env: extra environment variables, e.g. ``LOGLEVEL=INFO``
        max_restarts: times torchrun restarts the worker group after a failure; a restarted export
            rewrites what was not committed (never mixes two attempts)
        mounts: volumes, e.g. ``type=volume,src=trec-runs,dst=/runs,readonly,type=volume,src=trec-exports,dst=/exports``
            (``type=volume`` binds a PersistentVolumeClaim on Kubernetes; ``type=bind``, a host path, is local only)
        name: job name (``{experiment}/{run}``)
    """
    return _trec_job(["export", *args], name, image, j, cpu, gpu, memMB, h, env, max_restarts, mounts)


def evaluate(
    *args: str,
    image: str = "",
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_restarts: int = 0,
    mounts: Optional[List[str]] = None,
    name: str = "trec/evaluate",
) -> specs.AppDef:
    """Evaluate a trained run (retrieval through a FAISS index, optionally re-ranked): ``trec evaluate ARGS`` on every rank.

    Example: ``torchx run -s local_cwd ./launchers/components.py:evaluate -j 1x2 --
    --run-dir runs/tt --index exports/tt --ranker-run-dir runs/dcn``

    Args:
        args: arguments of ``trec evaluate``: ``--run-dir RUN [--index DIR] [--ranker-run-dir RUN2]
            [--set=KEY=VALUE ...] [KEY=VALUE ...]`` (repeat ``--set=KEY=VALUE`` with the ``=``: TorchX
            refuses a repeated option word)
        image: container image (Kubernetes); empty picks the trec CPU image, or the CUDA image
            when the job asks for GPUs; local_cwd ignores it and runs the working tree
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2``; with GPUs, nproc_per_node at most the GPUs per node
        cpu: CPUs per node (replica); each rank gets ``cpu / nproc_per_node`` OpenMP threads
        gpu: GPUs per node (replica); 0 evaluates on CPU with gloo, otherwise trec uses NCCL
        memMB: host memory per node in MB
        h: a registered TorchX named resource, e.g. ``aws_g5.12xlarge`` (overrides cpu, gpu and memMB)
        env: extra environment variables, e.g. ``LOGLEVEL=INFO``
        max_restarts: times torchrun restarts the worker group after a failure (evaluation starts over)
        mounts: volumes, e.g. ``type=volume,src=trec-runs,dst=/runs,type=volume,src=trec-exports,dst=/exports,readonly``
            (``type=volume`` binds a PersistentVolumeClaim on Kubernetes; ``type=bind``, a host path, is local only)
        name: job name (``{experiment}/{run}``)
    """
    return _trec_job(["evaluate", *args], name, image, j, cpu, gpu, memMB, h, env, max_restarts, mounts)


def tensorboard(
    run_dir: str,
    image: str = "",
    port: int = 6006,
    timeout: float = 24 * 3600,
    cpu: int = 1,
    memMB: int = 2048,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    name: str = "trec-tensorboard",
) -> specs.AppDef:
    """Serve a run's TensorBoard logs: ``tensorboard --logdir RUN_DIR/tb --bind_all --port PORT`` (one replica).

    Reuses TorchX's builtin ``metrics.tensorboard``, which stops the server after ``timeout``.
    For a long-lived server on Kubernetes use the Deployment in k8s/ instead. Example (then
    ``kubectl port-forward POD 6006``): ``torchx run -s kubernetes ./launchers/components.py:tensorboard
    --run_dir /runs/tt --mounts type=volume,src=trec-runs,dst=/runs,readonly``

    Args:
        run_dir: a training run directory (``trec train --run-dir``); its ``tb/`` holds the event files
        image: container image (Kubernetes); empty picks the trec CPU image; local_cwd ignores it
        port: port TensorBoard listens on (exposed as the ``http`` port)
        timeout: seconds after which the server exits
        cpu: CPUs
        memMB: memory in MB
        h: a registered TorchX named resource (overrides cpu and memMB)
        env: extra environment variables
        mounts: volumes, e.g. ``type=volume,src=trec-runs,dst=/runs,readonly`` (the runs PVC, read-only)
        name: job name
    """
    logdir = run_dir.rstrip("/") + "/tb"
    app = metrics.tensorboard(logdir=logdir, image=image or DEFAULT_IMAGE, timeout=timeout, port=port)
    app.name = name
    (role,) = app.roles
    # The builtin leaves resources, volumes and env empty; Kubernetes needs all three.
    role.resource = specs.resource(cpu=cpu, gpu=0, memMB=memMB, h=h)
    role.mounts = specs.parse_mounts(mounts) if mounts else []
    role.env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    return app
