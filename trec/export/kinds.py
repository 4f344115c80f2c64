"""Index kinds: export options → FAISS factory string, an empty (trained) index, search settings.

Every kind uses the inner-product metric: the two-tower score is a dot product (a cosine when
the towers L2-normalise), so an L2 index would rank by the wrong quantity. FAISS vector ids are
item indices, so every kind must accept ``add_with_ids``; IVF indexes do natively, the others
are wrapped in ``IDMap``:

========  ==========================================  ==================================
kind      factory string (METRIC_INNER_PRODUCT)        parameters
========  ==========================================  ==================================
flat      ``IDMap,Flat``                              none (exact search)
ivf_flat  ``IVF{nlist},Flat``                         nlist; search: nprobe
ivf_pq    ``IVF{nlist},PQ{m}x{nbits}np``              nlist, pq_m, pq_nbits; search: nprobe
          ``IDMap,IVF{nlist},PQ{m}x{nbits}np,RFlat``  + pq_refine_factor (exact re-rank)
hnsw      ``IDMap,HNSW{m},Flat``                      hnsw_m, ef_construction; search: ef_search
========  ==========================================  ==================================
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from trec.config import ExportConfig, IndexKind
from trec.errors import TrecError
from trec.export.backend import check_device, faiss_module, to_cpu, to_gpu

logger = logging.getLogger("trec")

# FAISS's k-means warns below 39 training points per centroid; fewer gives poor centroids.
MIN_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class IndexSpec:
    """What one index shard is: the kind, its factory string and resolved parameters."""

    kind: str
    dimension: int
    factory: str
    params: dict = field(default_factory=dict)
    """Build parameters after resolution (e.g. nlist chosen from the catalog size)."""
    search: dict = field(default_factory=dict)
    """Default search settings stored in each shard (nprobe, ef_search)."""

    @property
    def needs_training(self) -> bool:
        return self.kind in (IndexKind.ivf_flat, IndexKind.ivf_pq)

    @property
    def gpu_capable(self) -> bool:
        """FAISS has GPU versions of Flat, IVF-Flat and IVF-PQ; not of HNSW nor of a refine wrapper."""
        return self.kind in (IndexKind.flat, IndexKind.ivf_flat) or (
            self.kind == IndexKind.ivf_pq and not self.params.get("pq_refine_factor")
        )

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_nlist(requested: int, num_vectors: int, train_vectors: int) -> int:
    """IVF list count: ``requested``, or about 4 * sqrt(N) clamped so each list has ≥ 39 training points."""
    if requested > 0:
        if requested > train_vectors:
            raise TrecError(
                f"export.nlist={requested} needs at least {requested} training vectors, but only "
                f"{train_vectors} are available: lower export.nlist or raise export.train_sample"
            )
        return requested
    wanted = int(round(4 * math.sqrt(max(num_vectors, 1))))
    return max(1, min(wanted, train_vectors // MIN_POINTS_PER_CENTROID))


def index_spec(cfg: ExportConfig, dimension: int, num_vectors: int, train_vectors: int) -> IndexSpec:
    """Resolve ``cfg`` for a catalog of ``num_vectors`` D-dim vectors, ``train_vectors`` of them for training."""
    kind = IndexKind(cfg.index)
    search: dict = {}
    if kind == IndexKind.flat:
        return IndexSpec(kind.value, dimension, "IDMap,Flat")
    if kind == IndexKind.hnsw:
        params = {"hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction}
        return IndexSpec(kind.value, dimension, f"IDMap,HNSW{cfg.hnsw_m},Flat", params, {"ef_search": cfg.ef_search})
    nlist = resolve_nlist(cfg.nlist, num_vectors, train_vectors)
    search = {"nprobe": min(cfg.nprobe, nlist)}
    if kind == IndexKind.ivf_flat:
        return IndexSpec(kind.value, dimension, f"IVF{nlist},Flat", {"nlist": nlist}, search)
    if dimension % cfg.pq_m:
        raise TrecError(f"export.pq_m={cfg.pq_m} must divide the embedding dimension {dimension}")
    if not 1 <= cfg.pq_nbits <= 16:
        raise TrecError(f"export.pq_nbits={cfg.pq_nbits}: expected 1..16")
    if train_vectors < 2**cfg.pq_nbits:
        raise TrecError(
            f"ivf_pq with export.pq_nbits={cfg.pq_nbits} needs at least {2**cfg.pq_nbits} training vectors, "
            f"only {train_vectors} are available: lower export.pq_nbits or use ivf_flat"
        )
    params = {"nlist": nlist, "pq_m": cfg.pq_m, "pq_nbits": cfg.pq_nbits, "pq_refine_factor": cfg.pq_refine_factor}
    # "np": no polysemous training, which only serves Hamming-filtered search (unused here) and
    # costs seconds even on a few thousand vectors.
    factory = f"IVF{nlist},PQ{cfg.pq_m}x{cfg.pq_nbits}np"
    if cfg.pq_refine_factor > 0:
        # IndexRefine keeps its own sequential ids, so the ids live in an IDMap around it.
        factory = f"IDMap,{factory},RFlat"
    return IndexSpec(kind.value, dimension, factory, params, search)


def new_index(spec: IndexSpec):
    """An empty, untrained index of ``spec``, with its build and default search settings applied."""
    faiss = faiss_module()
    index = faiss.index_factory(spec.dimension, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == IndexKind.hnsw:
        faiss.downcast_index(index.index).hnsw.efConstruction = spec.params["ef_construction"]
    if spec.params.get("pq_refine_factor"):
        faiss.downcast_index(index.index).k_factor = float(spec.params["pq_refine_factor"])
    set_search_params(index, **spec.search)
    return index


def set_search_params(index, nprobe: int | None = None, ef_search: int | None = None, gpu: bool = False) -> None:
    """Apply IVF ``nprobe`` / HNSW ``ef_search`` to one index (through IDMap/refine wrappers)."""
    faiss = faiss_module()
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    if nprobe is not None:
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search is not None:
        space.set_index_parameter(index, "efSearch", int(ef_search))


def train_template(spec: IndexSpec, sample: np.ndarray, device: str = "cpu"):
    """The trained, empty index every shard starts from (train_vectors X D ``sample``).

    IVF kinds run k-means (and PQ codebook training) here, once: all shards copy these
    centroids, so a vector lands in the same list whichever shard holds it. Flat and HNSW need
    no training; their template is just empty.
    """
    index = new_index(spec)
    if not spec.needs_training:
        return index
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if _on_gpu(spec, device):
        gpu_index = to_gpu(index)
        gpu_index.train(sample)
        index = to_cpu(gpu_index)
        set_search_params(index, **spec.search)
    else:
        index.train(sample)
    return index


def add_vectors(index, ids: np.ndarray, vectors: np.ndarray, spec: IndexSpec, device: str = "cpu", chunk: int = 1 << 20):
    """Add N X D ``vectors`` with int64 ``ids`` (item indices) to ``index``; returns the CPU index."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    target = to_gpu(index) if _on_gpu(spec, device) else index
    # Chunks bound the temporary memory of coarse assignment / encoding, on GPU especially.
    for start in range(0, len(ids), chunk):
        target.add_with_ids(vectors[start : start + chunk], ids[start : start + chunk])
    if target is index:
        return index
    index = to_cpu(target)
    set_search_params(index, **spec.search)
    return index


def _on_gpu(spec: IndexSpec, device: str) -> bool:
    if check_device(device) != "cuda":
        return False
    if not spec.gpu_capable:
        logger.info("faiss: %s builds on the CPU (FAISS has no GPU version of %s)", spec.kind, spec.factory)
        return False
    return True
