"""The model side of `trec export`: each rank encodes its slice of the catalog with the item tower.

Tables stay model-parallel (every rank takes part in every lookup, through DMP) while the
catalog is split data-parallel: rank r encodes a disjoint slice of the item indices and writes
``embeddings/items-part-r.parquet`` itself, so no table and no full embedding matrix is ever
gathered on one rank. The parts then feed :func:`trec.export.build_sharded_index`. Every
rank also loads the unsharded weights for the servable bundle, which rank 0 writes
(:func:`trec.export.bundle.write_bundle`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trec import __version__
from trec.errors import TrecError
from trec.export.build import build_sharded_index
from trec.export.bundle import BUNDLE_DIR, binding_of, write_bundle
from trec.export.layout import EMBEDDINGS_DIR, export_directory
from trec.export.parts import EmbeddingPartWriter, part_path

logger = logging.getLogger("trec")

_ENTITY = {"items": ("item", "item_id"), "users": ("user", "user_id")}


def raw_ids_of(dataset, feature: str) -> np.ndarray:
    """index → raw ID; a hash-mapped feature has no way back, so its indices stand in."""
    try:
        return dataset.raw_ids(feature)
    except TrecError:
        return np.arange(dataset.feature(feature).cardinality, dtype=np.int64)


@torch.no_grad()
def write_part(directory: Path, kind: str, encode: Callable, dataset, ctx, batch_size: int,
               history_max_len: int) -> int:
    """Encode this rank's slice of all users or items into ``directory/KIND-part-RANK.parquet``.

    Returns the rows this rank wrote; logs the throughput (rows encoded per second, all ranks).
    """
    from trec.evaluation.retrieval import entity_batches

    entity, feature = _ENTITY[kind]
    count = dataset.num_items if entity == "item" else dataset.num_users
    raw = raw_ids_of(dataset, feature)
    written, started = 0, time.perf_counter()
    batches = entity_batches(dataset, np.arange(count, dtype=np.int64), entity, batch_size, ctx, history_max_len)
    progress = tqdm(total=count, disable=not ctx.is_main, desc=f"encode {kind}", unit=kind[:-1], mininterval=5.0)
    writer = None
    with progress:
        for selected, batch in batches:
            vectors = encode(batch)
            real = selected >= 0
            if writer is None:
                writer = EmbeddingPartWriter(part_path(directory, kind, ctx.rank), dimension=vectors.shape[1])
            writer.write(raw[selected[real]], selected[real], vectors[torch.as_tensor(real)].float().cpu().numpy())
            written += int(real.sum())
            progress.update(int(real.sum()) * ctx.world_size)
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - started
    logger.info("export: encoded %d %s on %d ranks in %.1f s (%.0f %s/s)", count, kind, ctx.world_size, seconds,
                count / max(seconds, 1e-9), kind)
    return written


def bundled_run(run_dir: Path, dataset) -> tuple:
    """A trained run to put in the bundle: (its config, inference checkpoint, binding), refused (one line)
    when it was trained on another dataset than ``dataset`` (the retriever's)."""
    from trec.checkpoint import checkpoint_for_inference
    from trec.runs import RunDir, check_run_dataset, dataset_fingerprint, run_config

    run = RunDir(Path(run_dir))
    cfg = run_config(run.root)
    record = check_run_dataset(run, dataset)
    checkpoint = checkpoint_for_inference(run.root)
    run_id = record["run_id"] if record else None
    return cfg, checkpoint, binding_of(run.root, checkpoint, str(cfg.model.name), dataset_fingerprint(dataset), run_id)


def export_run(loaded, out: Path, ctx, users: bool = False, overwrite: bool = False, ranker: tuple | None = None) -> dict:
    """Export a trained two-tower run into ``out`` (collective); returns the manifest.

    ``out/bundle/`` gets the servable bundle (:mod:`trec.export.bundle`) with ``ranker``, a
    :func:`bundled_run`, if given; the export's checksums cover its files too.
    """
    from trec.runs import retriever_of_run

    retriever = retriever_of_run(loaded)
    cfg = loaded.cfg
    source = {
        **loaded.binding(),  # run_id, run_dir, checkpoint_name, step, dataset_fingerprint: checked on every load
        "checkpoint": str(loaded.checkpoint.resolve()),
        "config": str(loaded.run.config.resolve()),
        "dataset": str(loaded.dataset.path.resolve()),
        "trec_version": __version__,
    }
    with export_directory(out, overwrite=overwrite) as tmp:
        parts = tmp / EMBEDDINGS_DIR
        write_part(parts, "items", retriever.encode_items, loaded.dataset, ctx, cfg.data.eval_batch_size,
                   cfg.data.history_max_len)
        if users:
            write_part(parts, "users", retriever.encode_users, loaded.dataset, ctx, cfg.data.eval_batch_size,
                       cfg.data.history_max_len)
        binding = {**loaded.binding(), "model": str(cfg.model.name)}
        bundle = write_bundle(tmp, loaded.dataset, (cfg, loaded.checkpoint, binding), ranker, ctx.is_main)
        if bundle is not None:
            source["bundle"] = {"path": BUNDLE_DIR, "version": bundle["version"],
                                "ranker_run_dir": ranker[2]["run_dir"] if ranker else None}
        device = "cuda" if ctx.device.type == "cuda" else "cpu"
        return build_sharded_index(tmp, cfg.export, normalized=retriever.normalized, source=source,
                                   device=device)


def export_trained_run(run_dir: str | Path, out: str | Path, *, users: bool | None = None,
                       ranker_run_dir: str | Path | None = None, overwrite: bool = False,
                       overrides: Sequence[str] = ()) -> dict:
    """Export the trained two-tower run ``run_dir`` into ``out`` and return its manifest: `trec export`, and
    ``trec.export(...)`` in Python.

    The run's best (or newest) checkpoint encodes the catalog into a sharded FAISS index, and ``out/bundle/``
    gets what `trec serve` and :class:`trec.Recommender` load, with ``ranker_run_dir`` (a DCN run of the same
    dataset) as re-ranker when given. ``users``: also export user vectors (None: the config's ``export.users``);
    ``overrides``: dotted keys applied to the run's config, e.g. ``export.index=hnsw``. Runs in this process,
    or collectively on every rank when the caller runs under torchrun.
    """
    from trec.data import PreparedDataset
    from trec.distributed import distributed_session
    from trec.runs import load_trained_run, run_config

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    with distributed_session(cfg.training.seed, cfg.training.device, cfg.logging.level) as ctx:
        dataset = PreparedDataset.open(cfg.data.path, positive_threshold=cfg.data.positive_threshold)
        # Checked before any model is loaded: a ranker of another dataset is refused in one line.
        ranker = bundled_run(Path(ranker_run_dir), dataset) if ranker_run_dir else None
        loaded = load_trained_run(run_dir, ctx, overrides, dataset)
        return export_run(loaded, Path(out), ctx, users=cfg.export.users if users is None else users,
                          overwrite=overwrite, ranker=ranker)
