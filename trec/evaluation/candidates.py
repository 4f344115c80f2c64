"""Candidate generation and hard-negative mining: a retriever's top-N items per user.

A :data:`CandidateGenerator` maps a batch of users to their top-N items: it encodes them with a
retriever's user encoder and ranks through a :data:`~trec.evaluation.topk.TopK` source (exact
over the catalog, or a FAISS index). Two-stage evaluation and ``trec recommend`` re-rank its
candidates; :func:`load_or_mine_hard_candidates` gives the ranker its hard negatives, cached in
the ranker's run directory.

The retriever is duck-typed (this layer is below the models): an object with
``encode_users(batch) -> R X D`` and ``encode_items(batch) -> R X D`` (a
:class:`trec.models.Retriever`); another run's retriever comes from a loader
(:data:`trec.models.RetrieverLoader`), never imported from above.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trec.config import DataConfig
from trec.data import Csr, PreparedDataset, RecBatch, check_indices
from trec.distributed import DistContext, barrier, dist_sum
from trec.errors import TrecError
from trec.evaluation.retrieval import encode_all_items, entity_batches
from trec.evaluation.topk import TopK, exact_topk, exclusion_keys
from trec.io import atomic_path

logger = logging.getLogger("trec")

CandidateGenerator = Callable[[np.ndarray, RecBatch, int], tuple[torch.Tensor, torch.Tensor]]
"""(users (R,) with -1 padding, their user-encoder batch of R rows, n) → (R X n item indices,
best first; R X n scores; -1 / -inf where a user has fewer than n eligible items). Items of the
excluded splits never appear. Collective: every rank calls it once per batch, the same number of
times."""

Scorer = Callable[[np.ndarray, np.ndarray], torch.Tensor]
"""(users (M,), items (M,)) → (M,) ranker scores. Collective: M is the same on every rank. (Serving passes
request positions as ``users``: its scorer knows each position's features.)"""


def user_batches(dataset: PreparedDataset, users: np.ndarray, data_cfg: DataConfig,
                 ctx: DistContext) -> Iterator[tuple[np.ndarray, RecBatch]]:
    """This rank's slice of ``users`` as user-encoder batches (see :func:`trec.evaluation.retrieval.entity_batches`)."""
    return entity_batches(dataset, users, "user", data_cfg.eval_batch_size, ctx, data_cfg.history_max_len)


def retrieve_candidates(encode_users: Callable[[RecBatch], torch.Tensor], topk: TopK, exclusions: Csr | None,
                        num_items: int) -> CandidateGenerator:
    """The generator that encodes a batch of users and ranks them through ``topk``; the items each
    user has in ``exclusions`` (a user → items Csr, or None) are never candidates."""

    @torch.no_grad()
    def generate(users: np.ndarray, batch: RecBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = encode_users(batch)  # collective: every rank encodes its batch
        return topk(queries, exclusion_keys(exclusions, users, num_items, queries.device), n)

    return generate


def rerank(score: Scorer, users: np.ndarray, candidates: torch.Tensor, candidate_scores: torch.Tensor,
           chunk_rows: int, retrieval_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of each row in the two-stage order: (R X n items, R X n two-stage scores).

    The two-stage score is the ranker's plus ``retrieval_weight`` times the retrieval score.
    Rows are scored in chunks of about ``chunk_rows`` (user, item) pairs; the chunk count
    depends only on R and n, so every rank calls the (collective) scorer equally often.
    Candidates with a -inf retrieval score (fillers) stay last.
    """
    rows, n = candidates.shape
    flat_users = np.repeat(users, n)
    flat_items = candidates.reshape(-1).cpu().numpy()
    per_chunk = max(1, chunk_rows // max(n, 1)) * n
    parts = [score(flat_users[start : start + per_chunk], flat_items[start : start + per_chunk])
             for start in range(0, rows * n, per_chunk)]
    scores = (torch.cat(parts).reshape(rows, n).float() if parts else torch.zeros(rows, n)).to(candidates.device)
    filler = torch.isneginf(candidate_scores)
    if retrieval_weight:
        scores = scores + retrieval_weight * candidate_scores.masked_fill(filler, 0.0)
    scores = scores.masked_fill(filler, -torch.inf)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return candidates.gather(1, order), scores.gather(1, order)


# --------------------------------------------------------------------------------------------
# hard negatives for the ranker
# --------------------------------------------------------------------------------------------


def mine_hard_candidates(retriever: Any, data_cfg: DataConfig, dataset: PreparedDataset, top_n: int, skip: int,
                         ctx: DistContext) -> Csr:
    """Each user's ``top_n`` highest-scored items that are not in the user's training data, after
    the first ``skip`` of them (exact search with ``retriever``, its run's ``data_cfg``).

    Returns a user → items Csr, identical on every rank (collective: each rank
    retrieves for its slice of the users, the slices are summed across ranks).
    """
    items = encode_all_items(retriever.encode_items, dataset, data_cfg.eval_batch_size, ctx, data_cfg.history_max_len)
    generate = retrieve_candidates(retriever.encode_users, exact_topk(items), dataset.user_items(["train"]),
                                   dataset.num_items)
    users = np.arange(dataset.num_users, dtype=np.int64)
    n = min(skip + top_n, dataset.num_items)
    table = torch.full((dataset.num_users, n), 0, dtype=torch.int64, device=ctx.device)
    valid = torch.zeros((dataset.num_users, n), dtype=torch.int64, device=ctx.device)
    for selected, batch in user_batches(dataset, users, data_cfg, ctx):
        found, scores = generate(selected, batch, n)
        real = torch.as_tensor(selected >= 0, device=ctx.device)
        rows = torch.as_tensor(selected, device=ctx.device)[real]
        table[rows] = found[real]
        valid[rows] = (~torch.isneginf(scores[real])).long()
    dist_sum(table)  # each row was filled by exactly one rank
    dist_sum(valid)
    keep = valid.bool().cpu()
    keep[:, :skip] = False
    offsets = np.zeros(dataset.num_users + 1, np.int64)
    np.cumsum(keep.sum(dim=1).numpy(), out=offsets[1:])
    return Csr(offsets, table.cpu()[keep].numpy())


def load_or_mine_hard_candidates(cache: Path, retrieval_dir: Path, top_n: int, skip: int, dataset: PreparedDataset,
                                 ctx: DistContext, load_retriever: Callable[[Path, PreparedDataset], Any]) -> Csr:
    """Hard candidates from ``cache`` if it was mined from ``retrieval_dir``'s current inference
    checkpoint on this dataset with the same ``top_n`` and ``skip``; otherwise mined now with that
    checkpoint and written to ``cache`` (Parquet, atomically, by rank 0). A user → items Csr; collective.

    ``load_retriever(run_dir, dataset)`` gives the run as a :class:`trec.models.RetrieverRun`: its
    ``source`` keys the cache, and its model is loaded (``load()``) only to mine.
    """
    source = str(Path(retrieval_dir).resolve())
    run = load_retriever(Path(retrieval_dir), dataset)
    # Keyed by the retriever's checkpoint and the dataset too (the run's source): a retrained
    # retriever or a re-prepared dataset must not reuse candidates mined from the old ones.
    settings = {"top_n": str(top_n), "skip": str(skip)} | dict(run.source)
    cached = _read_hard_candidates(cache, settings, dataset.num_users, dataset.num_items)
    if cached is not None:
        logger.info("hard negatives: reusing %s (mined from %s)", cache, source)
        return cached
    candidates = mine_hard_candidates(run.load(), run.data, dataset, top_n, skip, ctx)
    if ctx.is_main:
        _write_hard_candidates(cache, candidates, settings)
    barrier()
    logger.info("hard negatives: mined the top %d non-train items (after the first %d) of %d users from %s → %s",
                top_n, skip, dataset.num_users, source, cache)
    return candidates


def _write_hard_candidates(path: Path, candidates: Csr, settings: dict[str, str]) -> None:
    lists = pa.ListArray.from_arrays(pa.array(candidates.offsets, pa.int64()).cast(pa.int32()),
                                     pa.array(candidates.values, pa.int64()))
    table = pa.table({"user": pa.array(np.arange(candidates.num_rows), pa.int64()), "items": lists})
    table = table.replace_schema_metadata(settings)
    with atomic_path(path) as tmp:  # readers see the whole file or none
        pq.write_table(table, tmp)


def _read_hard_candidates(path: Path, settings: dict[str, str], num_users: int, num_items: int) -> Csr | None:
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise TrecError(f"{path}: not a readable hard-negatives cache ({error}); delete it to mine again") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if any(meta.get(key) != value for key, value in settings.items()) or table.num_rows != num_users:
        logger.warning("hard negatives: %s was mined with other settings (%s); mining again", path, meta)
        return None
    if "items" not in table.column_names or not pa.types.is_list(table["items"].type):
        raise TrecError(f"{path}: no list column 'items'; delete it to mine again")
    column = table["items"].combine_chunks()
    check_indices(column.flatten(), 0, num_items, path, "items")  # FBGEMM would clamp a bad index silently
    offsets = column.offsets.to_numpy().astype(np.int64)
    return Csr(offsets - offsets[0], column.flatten().to_numpy().astype(np.int64))
