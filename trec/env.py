"""What this machine offers a trec job: package versions, devices, the backend that would be picked."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from trec.memory import HUGE_PAGES_ENV

_PACKAGES = {
    "trec": ("trec",),
    "torch": ("torch",),
    "torchrec": ("torchrec",),
    "fbgemm_gpu": ("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm_gpu", "fbgemm_gpu-cpu"),
    "faiss": ("faiss-gpu", "faiss-cpu", "faiss"),
    "torchx": ("torchx",),
    "pyarrow": ("pyarrow",),
    "numpy": ("numpy",),
}


def _distribution(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})" if len(names) > 1 else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _importable(module: str) -> str:
    """'ok', or the import error: an installed fbgemm_gpu that fails to load is the usual trap."""
    try:
        __import__(module)
        return "ok"
    except Exception as error:  # noqa: BLE001 - report any import failure verbatim
        return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def collect_env() -> dict:
    from trec.distributed import pick_device

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    device, backend = pick_device("auto")
    faiss_gpus = 0
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - faiss absence is reported in imports below
        pass
    return {
        "versions": {name: _distribution(dists) for name, dists in _PACKAGES.items()},
        "imports": {module: _importable(module) for module in ("torchrec", "fbgemm_gpu", "faiss", "torchx")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": devices,
        "faiss_gpus": faiss_gpus,
        "device": str(device),
        "backend": backend,
        "huge_pages": {"torch_allocator": os.environ.get(HUGE_PAGES_ENV, "unset"),
                       "kernel": kernel_huge_pages()},
    }


def kernel_huge_pages() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def format_env(report: dict) -> str:
    lines = ["versions:"]
    lines += [f"  {name:<11} {version}" for name, version in report["versions"].items()]
    lines.append("imports:")
    lines += [f"  {module:<11} {status}" for module, status in report["imports"].items()]
    lines.append(f"python:       {report['python']} on {report['platform']} ({report['cpu_count']} CPUs)")
    gpus = ", ".join(report["gpus"]) or "none"
    lines.append(f"gpus:         {gpus} (cuda {report['cuda_version'] or '-'}, faiss gpus {report['faiss_gpus']})")
    lines.append(f"backend:      {report['backend']} on {report['device']}")
    pages = report["huge_pages"]
    on = pages["torch_allocator"] == "1" and pages["kernel"] in ("always", "madvise")
    lines.append(f"huge pages:   {'on: buffers of 2 MiB or more (the tables)' if on else 'off'} "
                 f"({HUGE_PAGES_ENV}={pages['torch_allocator']}, kernel transparent_hugepage {pages['kernel']})")
    return "\n".join(lines)
