"""Build the sharded FAISS index of an export from its item embedding parts, on one rank or many.

Sharding rule: the item with index ``i`` goes to shard ``i % num_shards``, and shard ``k`` is
built by rank ``k % world_size``. The rule depends only on the item index, never on which rank
encoded the item, so the same parts give the same shards at any world size.

IVF kinds train once, on rank 0, on a sample drawn from every part (``train_sample`` item
indices chosen with ``seed``, the same whatever the world size); the trained empty index is
broadcast as FAISS bytes, and every shard starts from that copy. All shards therefore share one
coarse quantizer (and PQ codebook): a vector lands in the same inverted list whichever shard
holds it, so searching all shards and merging the top-k gives exactly what one unsharded index
with that quantizer gives. HNSW shards are independent graphs; merging the shards' top-k is still
an exact top-k over the shards' answers, only each graph's own search is approximate.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trec import __version__
from trec.config import ExportConfig
from trec.errors import TrecError
from trec.export.backend import deserialize, faiss_version, serialize
from trec.distributed import barrier
from trec.export.comm import all_succeeded, broadcast_bytes, group_rank_world
from trec.export.kinds import IndexSpec, add_vectors, index_spec, train_template
from trec.export.layout import EMBEDDINGS_DIR, IDS_FILE, INDEX_DIR, MANIFEST, shard_file
from trec.export.manifest import read_manifest, write_manifest
from trec.export.parts import KINDS, iter_embedding_batches, part_dimension, part_paths, part_rows
from trec.io import atomic_path

logger = logging.getLogger("trec")

SHARDING_RULE = "item index % num_shards"


def shard_of(indices: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard of each item index (N,) → (N,) int64."""
    return np.asarray(indices, dtype=np.int64) % num_shards


def shards_of_rank(rank: int, world_size: int, num_shards: int) -> list[int]:
    """Shards that rank ``rank`` builds: k with k % world_size == rank."""
    return list(range(rank, num_shards, world_size))


# --------------------------------------------------------------------------------------------
# rank 0: catalog scan and training sample
# --------------------------------------------------------------------------------------------


@dataclass
class Catalog:
    """Every item of the parts, by index: ``indices`` (N,) sorted int64, ``raw_ids`` (N,) aligned."""

    indices: np.ndarray
    raw_ids: np.ndarray
    dimension: int


def scan_catalog(paths: list[Path]) -> Catalog:
    """Read the ``raw_id`` and ``index`` columns of every part (no vectors) and validate them."""
    dimension = part_dimension(paths[0])
    indices, raw_ids = [], []
    for batch in iter_embedding_batches(paths, columns=("raw_id", "index")):
        indices.append(batch.indices)
        raw_ids.append(batch.raw_ids)
    indices = np.concatenate(indices) if indices else np.empty(0, np.int64)
    if len(indices) == 0:
        raise TrecError(f"{paths[0].parent}: the item embedding parts hold no rows")
    if indices.min() < 0:
        raise TrecError(f"{paths[0].parent}: item parts hold a negative index ({indices.min()})")
    order = np.argsort(indices, kind="stable")
    indices = indices[order]
    duplicated = indices[1:][indices[1:] == indices[:-1]]
    if len(duplicated):
        raise TrecError(
            f"{paths[0].parent}: item index {duplicated[0]} appears in more than one row of the parts "
            "(each rank must encode a disjoint slice of the catalog)"
        )
    raw_ids = [r for r in raw_ids if len(r)]
    if len({r.dtype.kind for r in raw_ids}) > 1:
        raise TrecError(f"{paths[0].parent}: item parts mix integer and string raw_id columns")
    raw = np.concatenate(raw_ids)[order]
    return Catalog(indices=indices, raw_ids=raw, dimension=dimension)


def choose_sample(indices: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Item indices (sorted) that train the index: all of them, or ``size`` drawn with ``seed``."""
    if len(indices) <= size:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=size, replace=False))


def read_rows(paths: list[Path], wanted: np.ndarray | None = None, shard: tuple[int, int] | None = None):
    """(ids (n,) sorted, vectors n X D) of the part rows whose index is in sorted ``wanted``,
    or in shard ``shard = (k, num_shards)``. Streams the parts; holds only the selected rows."""
    ids, vectors = [], []
    for batch in iter_embedding_batches(paths, columns=("index", "vector")):
        if wanted is not None:
            pos = np.minimum(np.searchsorted(wanted, batch.indices), len(wanted) - 1)
            keep = wanted[pos] == batch.indices
        else:
            keep = shard_of(batch.indices, shard[1]) == shard[0]
        ids.append(batch.indices[keep])
        vectors.append(batch.vectors[keep])
    ids = np.concatenate(ids)
    order = np.argsort(ids, kind="stable")  # index order: shards do not depend on part layout
    return ids[order], np.concatenate(vectors)[order]


def is_normalized(vectors: np.ndarray, tolerance: float = 1e-3) -> bool:
    norms = np.linalg.norm(vectors, axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) <= tolerance))


# --------------------------------------------------------------------------------------------
# the collective build
# --------------------------------------------------------------------------------------------


def _plan_on_rank0(
    paths: list[Path], out_dir: Path, cfg: ExportConfig, num_shards: int, normalized: bool | None, device: str
) -> tuple[dict, object]:
    """Scan, sample, train; write ``index/ids.parquet``. Returns (plan for the manifest, template index)."""
    catalog = scan_catalog(paths)
    sample_ids = choose_sample(catalog.indices, cfg.train_sample, cfg.seed)
    _, sample = read_rows(paths, wanted=sample_ids)
    spec = index_spec(cfg, catalog.dimension, len(catalog.indices), len(sample))
    logger.info("export: %s over %d items (D=%d), %d shards, trained on %d vectors",
                spec.factory, len(catalog.indices), catalog.dimension, num_shards, len(sample))
    template = train_template(spec, sample, device)
    write_ids(out_dir / IDS_FILE, catalog)
    plan = {
        "spec": spec.to_dict(),
        "num_vectors": int(len(catalog.indices)),
        "vectors_per_shard": np.bincount(shard_of(catalog.indices, num_shards), minlength=num_shards).tolist(),
        "normalized": is_normalized(sample) if normalized is None else bool(normalized),
        "training": {"sample": int(len(sample)), "seed": cfg.seed} if spec.needs_training else None,
        "raw_id_type": "int64" if catalog.raw_ids.dtype.kind in "iu" else "string",
    }
    return plan, template


def write_ids(path: Path, catalog: Catalog) -> None:
    """``index/ids.parquet``: columns ``index`` (sorted int64) and ``raw_id``, so search needs no parts."""
    raw_type = pa.int64() if catalog.raw_ids.dtype.kind in "iu" else pa.string()
    table = pa.table({"index": pa.array(catalog.indices, pa.int64()), "raw_id": pa.array(catalog.raw_ids, raw_type)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _together(what: str, step) -> None:
    """Run ``step`` here; if it fails on any rank, every rank raises, so that none waits forever
    in a later collective. The failing rank raises its own error, the others say where to look."""
    failure = None
    try:
        step()
    except Exception as error:  # noqa: BLE001 (re-raised below, after the ranks agree)
        failure = error
    if not all_succeeded(failure is None):
        if failure is not None:
            raise failure
        raise TrecError(f"export: {what} failed on another rank (see that rank's error)")


def _share_plan(plan: dict | None, template_bytes: bytes | None) -> tuple[dict, bytes]:
    """Rank 0's plan (JSON) and trained empty index (FAISS bytes), on every rank."""
    header = broadcast_bytes(json.dumps(plan).encode() if plan is not None else None)
    return json.loads(header), broadcast_bytes(template_bytes)


def build_shard(paths: list[Path], out_dir: Path, shard: int, num_shards: int, template_bytes: bytes,
                spec: IndexSpec, expected: int, device: str) -> None:
    """Fill a copy of the template with the shard's vectors and write ``index/shard-K.faiss``."""
    ids, vectors = read_rows(paths, shard=(shard, num_shards))
    if len(ids) != expected:
        raise TrecError(f"{shard_file(shard)}: read {len(ids)} vectors, rank 0 counted {expected} (parts changed during export?)")
    index = add_vectors(deserialize(template_bytes), ids, vectors, spec, device)
    # Serialized here and written by Python: faiss.write_index ignores a failed fwrite, so a full
    # disk would leave a truncated shard (checksummed into the manifest as if it were whole).
    data = serialize(index)
    with atomic_path(out_dir / shard_file(shard)) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _embedding_listing(out_dir: Path) -> dict:
    listing = {}
    for kind in KINDS:
        try:
            paths = part_paths(out_dir / EMBEDDINGS_DIR, kind)
        except TrecError:
            continue
        listing[kind] = {
            "parts": [p.relative_to(out_dir).as_posix() for p in paths],
            "rows": [part_rows(p) for p in paths],
            "dimension": part_dimension(paths[0]),
        }
    return listing


def _manifest_fields(plan: dict, out_dir: Path, num_shards: int, source: dict | None) -> dict:
    import torch

    spec = plan["spec"]
    return {
        "dimension": spec["dimension"],
        "metric": "inner_product",
        "normalized": plan["normalized"],
        "index_kind": spec["kind"],
        "factory": spec["factory"],
        "params": spec["params"],
        "search_defaults": spec["search"],
        "training": plan["training"],
        "num_shards": num_shards,
        "shard_files": [shard_file(k) for k in range(num_shards)],
        "vectors_per_shard": plan["vectors_per_shard"],
        "num_vectors": plan["num_vectors"],
        "sharding": {"rule": SHARDING_RULE, "num_shards": num_shards},
        "id_mapping": {
            "faiss_id": "item index",
            "file": IDS_FILE,
            "columns": ["index", "raw_id"],
            "raw_id_type": plan["raw_id_type"],
            "parts": f"{EMBEDDINGS_DIR}/items-part-*.parquet",
        },
        "embeddings": _embedding_listing(out_dir),
        "source": json.loads(json.dumps(source or {}, default=str)),  # Paths etc. stored as text
        "versions": {"trec": __version__, "faiss": faiss_version(), "torch": torch.__version__},
    }


def build_sharded_index(
    export_dir: str | os.PathLike,
    cfg: ExportConfig,
    *,
    normalized: bool | None = None,
    source: dict | None = None,
    device: str = "cpu",
) -> dict:
    """Collective: build ``index/shard-K.faiss``, ``index/ids.parquet`` and ``manifest.json`` in ``export_dir``.

    Call on every rank once every rank has written all its parts under ``export_dir/embeddings/``
    (items, and users if exported: the manifest checksums every file present); ranks and world
    size are the process group's (0 and 1 without one). ``normalized``
    records whether the vectors are unit length (None: measured on the training sample);
    ``source`` (e.g. ``{"checkpoint": ..., "config": ...}``) is stored as given. ``device="cuda"``
    trains and adds on the GPU where FAISS can; the files written are the same format.
    Returns the manifest (on every rank).
    """
    rank, world_size = group_rank_world()
    out_dir = Path(export_dir)
    num_shards = cfg.num_shards or world_size
    if num_shards < 0:
        raise TrecError(f"export.num_shards={cfg.num_shards}: expected 0 (one per rank) or a positive count")
    barrier()  # every rank's parts are complete before anyone reads them
    paths = part_paths(out_dir / EMBEDDINGS_DIR, "items")

    planned: dict = {}

    def plan_and_train() -> None:
        (out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
        plan, template = _plan_on_rank0(paths, out_dir, cfg, num_shards, normalized, device)
        planned.update(plan=plan, template=serialize(template))

    _together("training the index", plan_and_train if rank == 0 else lambda: None)
    plan, template_bytes = _share_plan(planned.get("plan"), planned.get("template"))
    spec = IndexSpec(**plan["spec"])

    def build_my_shards() -> None:
        for shard in shards_of_rank(rank, world_size, num_shards):
            expected = plan["vectors_per_shard"][shard]
            build_shard(paths, out_dir, shard, num_shards, template_bytes, spec, expected, device)

    _together("building the index shards", build_my_shards)

    def manifest() -> None:
        write_manifest(out_dir, _manifest_fields(plan, out_dir, num_shards, source))

    _together(f"writing {MANIFEST}", manifest if rank == 0 else lambda: None)
    return read_manifest(out_dir)
