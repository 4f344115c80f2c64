"""The one place trec imports faiss: the module itself, GPU cloning, and (de)serialisation.

faiss is imported lazily (inside functions), so importing :mod:`trec.export` costs nothing and
a machine without faiss only fails when an index is actually built or searched.
"""

from __future__ import annotations

import functools

import numpy as np

from trec.errors import TrecError


@functools.lru_cache(maxsize=None)
def faiss_module():
    """The faiss module, or a TrecError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise TrecError("faiss is not installed: `make setup` installs faiss-cpu (faiss-gpu with `make setup-gpu`)") from None
    return faiss


def faiss_version() -> str:
    return faiss_module().__version__


def num_gpus() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    faiss = faiss_module()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def check_device(device: str) -> str:
    """Validate a faiss device name: "cpu", or "cuda" when faiss sees a GPU."""
    if device not in ("cpu", "cuda"):
        raise TrecError(f"faiss device: expected cpu or cuda, got '{device}'")
    if device == "cuda" and num_gpus() == 0:
        raise TrecError("faiss device 'cuda' requested but faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    return device


@functools.lru_cache(maxsize=None)
def _gpu_resources(gpu: int):
    # One StandardGpuResources per GPU for the process: it owns scratch memory and streams, and
    # must outlive every index cloned with it, hence the cache.
    return faiss_module().StandardGpuResources()


def current_gpu() -> int:
    """This rank's GPU: the CUDA device torch uses (trec.distributed sets it from LOCAL_RANK)."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def to_gpu(index, gpu: int | None = None):
    """Clone a CPU index onto GPU ``gpu`` (default: this rank's); IDMap wrappers stay on the host."""
    faiss = faiss_module()
    gpu = current_gpu() if gpu is None else gpu
    return faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, index)


def to_cpu(index):
    """Clone a GPU index back to its CPU type: the on-disk format is the CPU one either way."""
    return faiss_module().index_gpu_to_cpu(index)


def serialize(index) -> bytes:
    """FAISS's own binary format (the same bytes `faiss.write_index` writes)."""
    return faiss_module().serialize_index(index).tobytes()


def deserialize(data: bytes):
    return faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))
