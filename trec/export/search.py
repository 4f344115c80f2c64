"""Search an export: :class:`ShardedIndex` loads verified shards and answers top-k queries.

::

    index = ShardedIndex.load("exports/tt", device="cpu")     # verifies manifest and checksums
    index.nprobe = 32                                          # IVF kinds; ef_search for hnsw
    raw_ids, item_indices, scores = index.search(user_vectors, k=10)   # each N X k

On CPU the shards sit in one ``faiss.IndexShards`` (searched in parallel threads, results merged
by score; ``successive_ids=False`` because each shard already stores item indices as ids). On
GPU each shard is cloned onto a GPU (round robin over the visible GPUs) under the same
``IndexShards``; the results are the same. HNSW and refined IVF-PQ stay on the CPU (FAISS has
no GPU version of them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trec.errors import TrecError
from trec.export.backend import check_device, faiss_module, num_gpus, to_gpu
from trec.export.exact import exact_topk
from trec.export.kinds import IndexSpec, set_search_params
from trec.export.layout import EMBEDDINGS_DIR, IDS_FILE
from trec.export.manifest import read_manifest, verify_export
from trec.export.parts import read_embedding_parts
from trec.io import path_inside, quote

logger = logging.getLogger("trec")

class SearchResult(NamedTuple):
    """Top-k per query, best first; missing results (fewer than k items) are padded.

    ``raw_ids`` N X k (int64, padded with -1; or object strings, padded with None),
    ``item_indices`` N X k int64 (padded with -1), ``scores`` N X k float32 (padded with -inf).
    """

    raw_ids: np.ndarray
    item_indices: np.ndarray
    scores: np.ndarray


class RawIds:
    """Item index → raw item ID, from ``index/ids.parquet`` (sorted by index)."""

    def __init__(self, indices: np.ndarray, raw_ids: np.ndarray):
        self.indices = indices
        self.raw_ids = raw_ids
        self.is_integer = raw_ids.dtype.kind in "iu"

    @classmethod
    def read(cls, path: Path, num_vectors: int | None = None) -> "RawIds":
        """Read ``ids.parquet``; its ``index`` column must be distinct non-negative item indices, sorted."""
        try:
            table = pq.read_table(path, columns=["index", "raw_id"])
        except (OSError, pa.ArrowInvalid, KeyError) as error:
            cause = (str(error).strip().splitlines() or [type(error).__name__])[0]  # pyarrow's run to many lines
            raise TrecError(f"{IDS_FILE}: not a readable id mapping ({quote(cause)})") from None
        column = table.column("index")
        if not pa.types.is_integer(column.type) or column.null_count:
            raise TrecError(f"{IDS_FILE}: column 'index' must be integers without nulls, found {column.type}")
        indices = column.to_numpy().astype(np.int64)
        if len(indices) and (indices[0] < 0 or np.any(np.diff(indices) <= 0)):
            raise TrecError(f"{IDS_FILE}: column 'index' must be distinct non-negative item indices in ascending order")
        if num_vectors is not None and len(indices) != num_vectors:
            raise TrecError(f"{IDS_FILE}: {len(indices)} rows, manifest.json says num_vectors {num_vectors}")
        raw = table.column("raw_id").to_numpy(zero_copy_only=False)
        return cls(indices, raw if raw.dtype.kind in "iu" else raw.astype(object))

    def lookup(self, item_indices: np.ndarray) -> np.ndarray:
        """Raw IDs of an array of item indices (any shape); -1 / None where unknown or padding."""
        flat = np.asarray(item_indices, dtype=np.int64).ravel()
        pos = np.minimum(np.searchsorted(self.indices, flat), max(len(self.indices) - 1, 0))
        known = (flat >= 0) & (len(self.indices) > 0) & (self.indices[pos] == flat)
        if self.is_integer:
            out = np.full(flat.shape, -1, dtype=np.int64)
        else:
            out = np.full(flat.shape, None, dtype=object)
        out[known] = self.raw_ids[pos[known]]
        return out.reshape(np.shape(item_indices))


def _stored_ids(shard, name: str) -> np.ndarray:
    """The ids a shard returns from search: an ``IDMap``'s id map, or an IVF index's inverted lists."""
    faiss = faiss_module()
    index = faiss.downcast_index(shard)
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    try:
        ivf = faiss.extract_index_ivf(shard)
    except RuntimeError:
        raise TrecError(f"{name}: a {type(index).__name__} is not an index shard trec writes (IDMap or IVF)") from None
    lists = ivf.invlists
    ids = [faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
           for number in range(ivf.nlist) if lists.list_size(number)]
    return np.concatenate(ids).astype(np.int64, copy=False) if ids else np.zeros(0, np.int64)


def _check_shard_ids(name: str, ids: np.ndarray, catalog: np.ndarray, shard: int, num_shards: int) -> None:
    """Every id a shard stores is an item index of the export's catalog (``ids.parquet``), in this shard.

    Search results are item indices that index dataset tables and embedding rows downstream; an id
    outside the catalog would be looked up as some other item, or past the end of a table.
    """
    position = np.minimum(np.searchsorted(catalog, ids), max(len(catalog) - 1, 0))
    unknown = ids[(len(catalog) == 0) | (catalog[position] != ids)] if len(ids) else ids
    if len(unknown):
        raise TrecError(f"{name}: stores item index {int(unknown[0])}, which is not in {IDS_FILE} "
                        f"({len(unknown)} such ids; the shard does not belong to this export)")
    misplaced = ids[ids % num_shards != shard]  # SHARDING_RULE: item index % num_shards
    if len(misplaced):
        raise TrecError(f"{name}: stores item index {int(misplaced[0])}, which belongs in shard "
                        f"{int(misplaced[0] % num_shards)} (sharding rule: item index % {num_shards})")


class ShardedIndex:
    """The index shards of one export, searched as one index. Build with :meth:`load`."""

    def __init__(self, root: Path, manifest: dict, shards: list, combined, raw_ids: RawIds, device: str):
        self.root = root
        self.manifest = manifest
        self.device = device
        self._shards = shards  # keeps the Python owners of the shard indexes alive
        self._combined = combined
        self._raw_ids = raw_ids
        self._search = dict(manifest.get("search_defaults") or {})
        self._item_vectors: tuple[np.ndarray, np.ndarray] | None = None

    # ---------------------------------------------------------------------------------------- load

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", verify: bool = True) -> "ShardedIndex":
        """Open the export at ``path``: check the manifest against the files, then load every shard.

        ``verify`` also checks the SHA-256 of every file (reads the whole export once). A
        mismatch, a missing or an unlisted shard raises a TrecError naming the file.
        """
        faiss = faiss_module()
        root = Path(path)
        manifest = read_manifest(root)
        verify_export(root, manifest, checksums=verify)
        device = check_device(device)
        shards = [cls._read_shard(root, name, manifest, count)
                  for name, count in zip(manifest["shard_files"], manifest["vectors_per_shard"])]
        raw_ids = RawIds.read(path_inside(root, IDS_FILE, IDS_FILE), manifest["num_vectors"])
        for shard_number, (name, shard) in enumerate(zip(manifest["shard_files"], shards)):
            _check_shard_ids(name, _stored_ids(shard, name), raw_ids.indices, shard_number, len(shards))
        spec = IndexSpec(manifest["index_kind"], manifest["dimension"], manifest["factory"], manifest["params"])
        on_gpu = device == "cuda" and spec.gpu_capable
        if device == "cuda" and not on_gpu:
            logger.info("faiss: %s is searched on the CPU (FAISS has no GPU version of it)", manifest["factory"])
        if on_gpu:
            shards = [to_gpu(shard, k % num_gpus()) for k, shard in enumerate(shards)]
        combined = faiss.IndexShards(manifest["dimension"], True, False)  # threaded, ids kept as stored
        for shard in shards:
            combined.add_shard(shard)
        # IndexShards merges per-shard top-k by its own metric: it must rank by largest inner product.
        combined.metric_type = faiss.METRIC_INNER_PRODUCT
        index = cls(root, manifest, shards, combined, raw_ids, "cuda" if on_gpu else "cpu")
        index._apply_search_params()
        return index

    @staticmethod
    def _read_shard(root: Path, name: str, manifest: dict, expected: int):
        faiss = faiss_module()
        try:
            shard = faiss.read_index(str(root / name))
        except RuntimeError as error:
            first = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
            raise TrecError(f"{name}: not a readable FAISS index ({first})") from None
        if shard.d != manifest["dimension"] or shard.ntotal != expected:
            raise TrecError(
                f"{name}: holds {shard.ntotal} vectors of dimension {shard.d}, manifest.json says "
                f"{expected} of dimension {manifest['dimension']}"
            )
        if shard.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise TrecError(f"{name}: metric is not inner product (metric_type {shard.metric_type})")
        return shard

    def check_catalog(self, num_items: int, where: str) -> None:
        """Refuse an export holding an item index outside a dataset's ``num_items`` items (``where``: the dataset)."""
        indices = self._raw_ids.indices
        if len(indices) and int(indices[-1]) >= num_items:
            raise TrecError(f"{self.root}: holds item index {int(indices[-1])}, but {where} has only {num_items} "
                            f"items (0..{num_items - 1}); the export is of another dataset")

    # ------------------------------------------------------------------------------ description

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def num_vectors(self) -> int:
        return int(self.manifest["num_vectors"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def index_kind(self) -> str:
        return self.manifest["index_kind"]

    @property
    def normalized(self) -> bool:
        return bool(self.manifest.get("normalized"))

    # ------------------------------------------------------------------------ search parameters

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (ivf_flat, ivf_pq); None for other kinds."""
        return self._search.get("nprobe")

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._set("nprobe", value, ("ivf_flat", "ivf_pq"))

    @property
    def ef_search(self) -> int | None:
        """HNSW candidate list size per query (hnsw); None for other kinds."""
        return self._search.get("ef_search")

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._set("ef_search", value, ("hnsw",))

    def _set(self, name: str, value: int, kinds: tuple[str, ...]) -> None:
        if self.index_kind not in kinds:
            raise TrecError(f"{name} applies to {' and '.join(kinds)} indexes; this export is {self.index_kind}")
        if int(value) < 1:
            raise TrecError(f"{name} must be at least 1, got {value}")
        self._search[name] = int(value)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        for shard in self._shards:
            set_search_params(shard, gpu=self.device == "cuda", **self._search)

    # ----------------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` items by inner product for N X D ``queries`` (float32): each output N X k."""
        queries = self._check_queries(queries)
        if k < 1:
            raise TrecError(f"k must be at least 1, got {k}")
        scores, indices = self._combined.search(queries, k)
        return self._result(indices, scores)

    def exact_search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Brute-force top-``k`` over the exported vectors (the reference for ANN recall)."""
        queries = self._check_queries(queries)
        item_indices, vectors = self.item_vectors()
        indices, scores = exact_topk(queries, vectors, k, ids=item_indices)
        return self._result(indices, scores)

    def raw_ids(self, item_indices: np.ndarray) -> np.ndarray:
        """Raw item IDs of item indices (any shape); -1 / None for padding."""
        return self._raw_ids.lookup(item_indices)

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The exact exported item vectors: ``(item_indices (N,) sorted, vectors N X D)``, read
        from the embedding parts once and cached."""
        if self._item_vectors is None:
            _, indices, vectors = read_embedding_parts(self.root / EMBEDDINGS_DIR, "items")
            order = np.argsort(indices, kind="stable")
            self._item_vectors = (indices[order], vectors[order])
        return self._item_vectors

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise TrecError(f"queries must be N X {self.dimension} (the index dimension), got shape {tuple(queries.shape)}")
        return queries

    def _result(self, indices: np.ndarray, scores: np.ndarray) -> SearchResult:
        indices = np.asarray(indices, dtype=np.int64)
        scores = np.where(indices >= 0, scores, -np.inf).astype(np.float32)
        return SearchResult(self.raw_ids(indices), indices, scores)

    def __repr__(self) -> str:
        return (f"ShardedIndex({str(self.root)!r}, {self.manifest['factory']}, {self.num_vectors} vectors "
                f"in {self.num_shards} shards, device={self.device})")
