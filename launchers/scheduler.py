"""TorchX's Kubernetes scheduler with the restricted pod security the rest of k8s/ uses.

TorchX 0.7 builds each pod in ``kubernetes_scheduler.role_to_pod`` with an empty
``securityContext`` and offers no hook for one, so the pods it submits ran as whatever the
image says, with the runtime's default capabilities and a writable root filesystem. This
scheduler subclasses ``KubernetesScheduler`` and post-processes the Volcano Job its dry run
builds (a real submission sends exactly the dry run's request), giving every pod what the
manifests in k8s/ give theirs:

- pod: ``runAsNonRoot``, the images' numeric ``USER`` (docker/Dockerfile*) as user, group and
  ``fsGroup`` (so the PVCs are writable), ``seccompProfile: RuntimeDefault``, no service
  account token (trec pods call no Kubernetes API);
- container: ``allowPrivilegeEscalation: false``, every capability dropped, and a read-only root
  filesystem with an emptyDir at ``/tmp`` and ``HOME=/tmp`` (torchrun, Python and TensorBoard
  write there). A job that must write into its image opts out with
  ``-cfg read_only_root_filesystem=False``.

Host paths (``type=bind``/``type=device`` mounts) and privileged containers are refused: the
trec namespace enforces the "restricted" Pod Security Standard, so such pods would only be
rejected later, one by one, by the API server.

It is registered as TorchX's ``kubernetes`` scheduler (``torchx.schedulers`` entry points in
pyproject.toml), so ``torchx run -s kubernetes`` from this project's environment uses it.
"""

from __future__ import annotations

from typing import Any, Dict, List

from kubernetes.client.models import (
    V1Capabilities,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1Pod,
    V1PodSecurityContext,
    V1PodSpec,
    V1SeccompProfile,
    V1SecurityContext,
    V1Volume,
    V1VolumeMount,
)
from torchx.schedulers.api import AppDryRunInfo
from torchx.schedulers.kubernetes_scheduler import KubernetesJob, KubernetesOpts, KubernetesScheduler
from torchx.specs import AppDef, runopts

# The numeric USER of docker/Dockerfile and docker/Dockerfile.cuda (and of every pod in k8s/).
TREC_UID = 10001
TMP_VOLUME = "tmp"
TMP_SIZE_LIMIT = "8Gi"


def restrict_pod(pod: V1Pod, read_only_root: bool) -> None:
    """Give one TorchX-built ``V1Pod`` the restricted pod and container security contexts, in place.

    Raises ``ValueError`` for what the restricted profile forbids (host paths, privileged containers).
    """
    spec = pod.spec
    host_paths = [v.host_path.path for v in spec.volumes or [] if v.host_path is not None]
    if host_paths:
        raise ValueError(
            f"host path mounts {host_paths} are not allowed on Kubernetes (restricted pods):"
            " use type=volume,src=PVC,dst=PATH"
        )
    spec.automount_service_account_token = False
    spec.security_context = V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=TREC_UID,
        run_as_group=TREC_UID,
        fs_group=TREC_UID,  # makes the PVCs writable for the non-root user
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )
    for container in spec.containers:
        if container.security_context is not None and container.security_context.privileged:
            raise ValueError(f"container {container.name} asks to be privileged, which restricted pods forbid")
        container.security_context = V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=read_only_root,
        )
    if read_only_root:
        _add_writable_tmp(spec)


def _add_writable_tmp(spec: V1PodSpec) -> None:
    """An emptyDir at /tmp and ``HOME=/tmp`` in every container: the only writable places besides the mounts."""
    spec.volumes = [*(spec.volumes or []), V1Volume(
        name=TMP_VOLUME, empty_dir=V1EmptyDirVolumeSource(size_limit=TMP_SIZE_LIMIT))]
    for container in spec.containers:
        mounts = container.volume_mounts or []
        if any(m.mount_path == "/tmp" for m in mounts):
            raise ValueError(f"container {container.name} already mounts /tmp; read_only_root_filesystem needs it")
        container.volume_mounts = [*mounts, V1VolumeMount(name=TMP_VOLUME, mount_path="/tmp")]
        env = container.env or []
        if not any(e.name == "HOME" for e in env):  # the image's home is on the read-only root
            container.env = [*env, V1EnvVar(name="HOME", value="/tmp")]


class RestrictedKubernetesScheduler(KubernetesScheduler):
    """``KubernetesScheduler`` whose pods run restricted (see the module docstring)."""

    def _run_opts(self) -> runopts:
        opts = super()._run_opts()
        opts.add(
            "read_only_root_filesystem",
            type_=bool,
            default=True,
            help="mount the image read-only (writable: the mounts, /tmp and /dev/shm); False for a job"
            " that writes into its image",
        )
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: KubernetesOpts) -> AppDryRunInfo[KubernetesJob]:
        info = super()._submit_dryrun(app, cfg)
        read_only_root = bool(cfg.get("read_only_root_filesystem", True))
        tasks: List[Dict[str, Any]] = info.request.resource["spec"]["tasks"]
        for task in tasks:
            restrict_pod(task["template"], read_only_root)
        return info


def create_scheduler(session_name: str, client: Any = None, docker_client: Any = None,
                     **kwargs: Any) -> RestrictedKubernetesScheduler:
    """TorchX's scheduler factory signature (``torchx.schedulers`` entry point)."""
    return RestrictedKubernetesScheduler(session_name=session_name, client=client, docker_client=docker_client)
