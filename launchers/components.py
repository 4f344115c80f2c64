"""TorchX components for trec jobs: ``torchx run -s SCHEDULER ./launchers/components.py:NAME``.

Each component is a typed function whose docstring is its ``--help``; it returns an AppDef that
runs ``python -m trec ...`` under torchrun (via TorchX's builtin ``dist.ddp``), so the same
component launches on this workstation (``-s local_cwd``) and on Kubernetes (``-s kubernetes``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

# The image a Kubernetes job runs (docker/Dockerfile); local_cwd runs from the working tree instead.
DEFAULT_IMAGE = os.environ.get("TREC_IMAGE", "ghcr.io/trec-dev/trec:0.1.0-cpu")


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
) -> specs.AppDef:
    """``python -m trec COMMAND...`` on every rank of a torchrun job.

    torchrun reads ``--max-restarts`` from ``PET_MAX_RESTARTS``: when a worker dies the elastic agent
    restarts the whole group (up to that many times) and trec resumes from its newest checkpoint.
    """
    job_env = dict(env or {})
    job_env["PET_MAX_RESTARTS"] = str(max_restarts)
    job_env.setdefault("PYTHONUNBUFFERED", "1")
    return dist.ddp(
        *command,
        m="trec",
        name=name,
        image=image,
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        h=h,
        env=job_env,
        mounts=mounts,
    )


def train(
    *args: str,
    image: str = DEFAULT_IMAGE,
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
        args: arguments of ``trec train`` (``--config``, ``--data``, ``--run-dir``, ``KEY=VALUE`` overrides)
        image: container image (Kubernetes); ignored by local_cwd, which runs the working tree
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2``; with GPUs, nproc_per_node at most the GPUs per node
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica); 0 trains on CPU with gloo
        memMB: host memory per node in MB
        h: a named TorchX resource (overrides cpu, gpu and memMB)
        env: extra environment variables, e.g. ``LOGLEVEL=INFO,NCCL_DEBUG=WARN``
        max_restarts: times torchrun restarts the worker group after a failure; training resumes
            from the newest complete checkpoint in the run directory
        mounts: volumes, e.g. ``type=volume,src=trec-runs,dst=/runs``
        name: job name (``{experiment}/{run}``)
    """
    return _trec_job(["train", *args], name, image, j, cpu, gpu, memMB, h, env, max_restarts, mounts)
