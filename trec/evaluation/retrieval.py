"""Retrieval evaluation: full-catalog top-K for every evaluated user, distributed across ranks.

1. Each rank encodes a disjoint slice of the catalog with the item tower; the slices are summed
   across ranks into the full ``I X D`` item matrix (tables stay model-parallel: every rank
   takes part in every embedding lookup).
2. Each rank encodes a disjoint slice of the evaluated users with the user tower (their whole
   training history as input), scores them against every item, removes the items the user
   already has in training (every training interaction, whatever its label: the user has seen
   it), and takes the top K (:mod:`trec.evaluation.topk`: exact, popularity, or a FAISS index).
3. Metrics are summed per rank and all-reduced (:class:`trec.metrics.RankingAccumulator`).
Relevant items are the user's positive rows of the split (label >= data.positive_threshold);
a user without one is not evaluated. The popularity baseline (items ranked by their count of
positive training rows, same exclusions) is scored in the same pass, under ``popularity/``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from trec.config import DataConfig, EvaluationConfig, Gain
from trec.data import Csr, PreparedDataset, RecBatch, iter_index_batches
from trec.distributed import DistContext, dist_sum
from trec.evaluation.protocol import check_cutoffs
from trec.evaluation.topk import SCORE_CHUNK_ELEMENTS, exact_topk, exclusion_keys, index_topk, popularity_topk
from trec.metrics import RankingAccumulator, graded_gain, ideal_gains, topk_gains, topk_hits

logger = logging.getLogger("trec")


def entity_batches(
    dataset: PreparedDataset,
    ids: np.ndarray,
    entity: str,
    batch_size: int,
    ctx: DistContext,
    history_max_len: int,
) -> Iterator[tuple[np.ndarray, RecBatch]]:
    """This rank's slice of ``ids`` (user or item indices) as encoder batches.

    Every rank yields the same number of equally long batches, since each batch triggers
    collective embedding lookups; padding rows carry index -1 and no features.
    Yields (R row indices with -1 padding, batch of R rows on ``ctx.device``).
    """
    for positions in iter_index_batches(len(ids), batch_size, ctx.rank, ctx.world_size):
        selected = np.full(len(positions), -1, dtype=np.int64)
        real = positions >= 0
        selected[real] = ids[positions[real]]
        none = np.full(len(selected), -1, dtype=np.int64)
        users, items = (selected, none) if entity == "user" else (none, selected)
        labels = np.zeros(len(selected), dtype=np.float32)
        yield selected, dataset.build_batch(users, items, labels, history_max_len=history_max_len).to(ctx.device)


@torch.no_grad()
def encode_all_items(encode: Callable[[RecBatch], torch.Tensor], dataset, batch_size, ctx, history_max_len,
                     ids: np.ndarray | None = None) -> torch.Tensor:
    """``N X D`` embeddings of the sorted item indices ``ids`` (default the whole catalog: ``I X D``),
    identical on every rank."""
    ids = np.arange(dataset.num_items, dtype=np.int64) if ids is None else ids
    table = None
    for selected, batch in entity_batches(dataset, ids, "item", batch_size, ctx, history_max_len):
        vectors = encode(batch)
        if table is None:
            table = torch.zeros(len(ids), vectors.shape[1], device=ctx.device)
        real = selected >= 0
        rows = torch.as_tensor(np.searchsorted(ids, selected[real]), device=ctx.device)
        table[rows] = vectors[torch.as_tensor(real, device=ctx.device)]
    if table is None:  # this rank had no batch at all (cannot happen with num_items > 0)
        raise RuntimeError("no item batches were encoded")
    return dist_sum(table)  # each row was filled by exactly one rank


def evaluated_users(dataset: PreparedDataset, split: str, max_users: int, seed: int) -> tuple[np.ndarray, Csr]:
    """Users with at least one positive in ``split`` (optionally a seeded sample) and the user → items
    Csr of the split's positives (label >= the dataset's positive_threshold): the relevant items."""
    truth = dataset.user_items([split], positives=True)
    users = np.flatnonzero(truth.lengths > 0)
    if 0 < max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users, truth


def graded_truth(truth: Csr, labels: np.ndarray, rows: np.ndarray, k: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Graded gains ``2^label - 1`` of the relevant items of ``rows`` (``labels`` aligned with
    ``truth.values``): (P,) aligned with ``truth.keys(rows, ...)`` (the items are sorted per user)
    and U X k ideal gains."""
    positions, row_labels = Csr(truth.offsets, labels).pairs(rows)
    gains = graded_gain(torch.as_tensor(row_labels, device=device))
    return gains, ideal_gains(torch.as_tensor(positions, device=device), gains, len(rows), k)


class AnnRecall:
    """Mean overlap of an index's top-K with exact search's top-K (no exclusions), per cut-off."""

    def __init__(self, ks: Sequence[int], device: torch.device) -> None:
        self.ks = sorted(set(ks))
        self.sums = torch.zeros(len(self.ks) + 1, dtype=torch.float64, device=device)

    def add(self, approximate: torch.Tensor, exact: torch.Tensor) -> None:
        for i, k in enumerate(self.ks):
            same = (approximate[:, :k, None] == exact[:, None, :k]).any(dim=2)
            self.sums[i] += same.double().sum() / k
        self.sums[-1] += approximate.shape[0]

    def compute(self) -> dict[str, float]:
        sums = dist_sum(self.sums.clone())
        return {f"ann_recall@{k}": (sums[i] / sums[-1].clamp_min(1)).item() for i, k in enumerate(self.ks)}


@torch.no_grad()
def evaluate_retrieval(
    user_encoder: Callable[[RecBatch], torch.Tensor],
    item_table: torch.Tensor,
    dataset: PreparedDataset,
    split: str,
    exclude_splits: Sequence[str],
    cfg: EvaluationConfig,
    data_cfg: DataConfig,
    ctx: DistContext,
    seed: int = 0,
    index=None,
) -> dict[str, float]:
    """Top-K metrics of the model (and the popularity baseline) on ``split``.

    Args:
        user_encoder: batch → ``R X D`` user embeddings (the user tower).
        item_table: ``I X D`` item embeddings (see :func:`encode_all_items`).
        exclude_splits: splits whose items are never recommended to their user (e.g. train).
        index: a :class:`trec.export.ShardedIndex` of the same item embeddings: its top-K are
            scored too (``index/...`` keys) with its recall against exact search
            (``index/ann_recall@K``).
    Returns:
        flat keys: ``ndcg@10`` ... for exact search, ``popularity/ndcg@10`` ..., ``index/...``.
    """
    check_cutoffs(cfg.ks, dataset)
    num_items = dataset.num_items
    max_k = max(cfg.ks)
    users, truth = evaluated_users(dataset, split, cfg.max_users, seed)
    truth_labels = dataset.user_positive_labels(split)[1] if cfg.gain == Gain.graded else None
    exclusions = dataset.user_items(list(exclude_splits)) if cfg.exclude_train and exclude_splits else None
    sources = {"": exact_topk(item_table)}
    if cfg.popularity_baseline:
        sources["popularity/"] = popularity_topk(torch.as_tensor(dataset.item_counts, dtype=torch.float32,
                                                                 device=ctx.device))
    if index is not None:
        sources["index/"] = index_topk(index, num_items)
        ann = AnnRecall(cfg.ks, ctx.device)
    accumulators = {prefix: RankingAccumulator(cfg.ks, num_items, ctx.device) for prefix in sources}
    for selected, batch in entity_batches(dataset, users, "user", data_cfg.eval_batch_size, ctx, data_cfg.history_max_len):
        real = selected >= 0
        embeddings = user_encoder(batch)[torch.as_tensor(real, device=ctx.device)]
        batch_users = selected[real]
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(num_items, 1))
        for start in range(0, len(batch_users), chunk):
            rows = batch_users[start : start + chunk]
            queries = embeddings[start : start + chunk]
            relevant = torch.as_tensor(truth.keys(rows, num_items), device=ctx.device)
            num_relevant = torch.as_tensor(truth.lengths[rows], device=ctx.device)
            graded = None
            if truth_labels is not None:
                graded = graded_truth(truth, truth_labels, rows, max_k, ctx.device)
            excluded = exclusion_keys(exclusions, rows, num_items, ctx.device)
            for prefix, source in sources.items():
                top = source(queries, excluded, max_k)[0]
                gains = None if graded is None else topk_gains(top, relevant, graded[0], num_items)
                accumulators[prefix].add(top, topk_hits(top, relevant, num_items), num_relevant, item_table,
                                         gains, None if graded is None else graded[1])
            if index is not None:
                ann.add(sources["index/"](queries, None, max_k)[0], sources[""](queries, None, max_k)[0])
    metrics = {}
    for prefix, accumulator in accumulators.items():
        metrics.update({prefix + name: value for name, value in accumulator.compute().items()
                        if not (prefix and name == "users")})
    if index is not None:
        metrics.update({f"index/{name}": value for name, value in ann.compute().items()})
    return metrics
