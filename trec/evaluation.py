"""Retrieval evaluation: full-catalog top-K for every evaluated user, distributed across ranks.

1. Each rank encodes a disjoint slice of the catalog with the item tower; the slices are summed
   across ranks into the full ``I X D`` item matrix (tables stay model-parallel: every rank
   takes part in every embedding lookup).
2. Each rank encodes a disjoint slice of the evaluated users with the user tower (their whole
   training history as input), scores them against every item, removes the items the user
   already has in training, and takes the top K.
3. Metrics are summed per rank and all-reduced (:class:`trec.metrics.RankingAccumulator`).
The popularity baseline (items ranked by training count, same exclusions) is scored in the
same pass and reported under ``popularity/``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from trec.config import DataConfig, EvaluationConfig
from trec.data import PreparedDataset, RecBatch, iter_index_batches
from trec.distributed import DistContext
from trec.metrics import RankingAccumulator, topk_hits

logger = logging.getLogger("trec")

# Scores of at most this many (user, item) pairs are materialised at once.
_SCORE_CHUNK_ELEMENTS = 1 << 25


def csr_pairs(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (row position, value) pairs of the CSR rows ``rows``, vectorised.

    Returns (positions, values) where positions index into ``rows``.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    positions = np.repeat(np.arange(len(rows)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return positions, values[np.repeat(starts, lengths) + within]


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
def encode_all_items(encode: Callable[[RecBatch], torch.Tensor], dataset, batch_size, ctx, history_max_len) -> torch.Tensor:
    """``I X D`` embeddings of the whole catalog, identical on every rank."""
    ids = np.arange(dataset.num_items, dtype=np.int64)
    table = None
    for selected, batch in entity_batches(dataset, ids, "item", batch_size, ctx, history_max_len):
        vectors = encode(batch)
        if table is None:
            table = torch.zeros(dataset.num_items, vectors.shape[1], device=ctx.device)
        real = torch.as_tensor(selected >= 0, device=ctx.device)
        table[torch.as_tensor(selected, device=ctx.device)[real]] = vectors[real]
    if table is None:  # this rank had no batch at all (cannot happen with num_items > 0)
        raise RuntimeError("no item batches were encoded")
    if dist.is_initialized() and ctx.world_size > 1:
        dist.all_reduce(table)  # each row was filled by exactly one rank
    return table


def evaluated_users(dataset: PreparedDataset, split: str, max_users: int, seed: int) -> tuple[np.ndarray, tuple]:
    """Users with at least one interaction in ``split`` (optionally a seeded sample) and the split's CSR."""
    offsets, items = dataset.user_items([split])
    users = np.flatnonzero(np.diff(offsets) > 0)
    if 0 < max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users, (offsets, items)


def _keys(positions: np.ndarray, values: np.ndarray, num_items: int, device) -> torch.Tensor:
    return torch.as_tensor(np.sort(positions * num_items + values), device=device)


def score_topk(scores: torch.Tensor, exclude_keys: torch.Tensor | None, k: int) -> torch.Tensor:
    """Top-k item indices per row of ``U X I`` scores after removing the excluded (row, item) keys."""
    if exclude_keys is not None and exclude_keys.numel():
        scores = scores.clone()
        scores.view(-1)[exclude_keys] = -torch.inf
    return scores.topk(k, dim=1).indices


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
) -> dict[str, float]:
    """Top-K metrics of the model (and the popularity baseline) on ``split``.

    Args:
        user_encoder: batch → ``R X D`` user embeddings (the user tower).
        item_table: ``I X D`` item embeddings (see :func:`encode_all_items`).
        exclude_splits: splits whose items are never recommended to their user (e.g. train).
    """
    num_items = dataset.num_items
    max_k = min(max(cfg.ks), num_items)
    users, (truth_offsets, truth_items) = evaluated_users(dataset, split, cfg.max_users, seed)
    exclusions = dataset.user_items(list(exclude_splits)) if cfg.exclude_train and exclude_splits else None
    popularity = torch.as_tensor(dataset.item_counts, dtype=torch.float32, device=ctx.device)
    model_acc = RankingAccumulator(cfg.ks, num_items, ctx.device)
    baseline_acc = RankingAccumulator(cfg.ks, num_items, ctx.device)
    for selected, batch in entity_batches(dataset, users, "user", data_cfg.eval_batch_size, ctx, data_cfg.history_max_len):
        real = selected >= 0
        embeddings = user_encoder(batch)[torch.as_tensor(real, device=ctx.device)]
        batch_users = selected[real]
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(num_items, 1))
        for start in range(0, len(batch_users), chunk):
            rows = batch_users[start : start + chunk]
            truth_pos, truth_val = csr_pairs(truth_offsets, truth_items, rows)
            relevant = _keys(truth_pos, truth_val, num_items, ctx.device)
            num_relevant = torch.as_tensor(np.diff(truth_offsets)[rows], device=ctx.device)
            excluded = None
            if exclusions is not None:
                excluded = _keys(*csr_pairs(exclusions[0], exclusions[1], rows), num_items, ctx.device)
            model_top = score_topk(embeddings[start : start + chunk] @ item_table.T, excluded, max_k)
            model_acc.add(model_top, topk_hits(model_top, relevant, num_items), num_relevant, item_table)
            if cfg.popularity_baseline:
                baseline_top = score_topk(popularity.expand(len(rows), -1), excluded, max_k)
                baseline_acc.add(baseline_top, topk_hits(baseline_top, relevant, num_items), num_relevant, item_table)
    metrics = model_acc.compute()
    if cfg.popularity_baseline:
        metrics.update({f"popularity/{name}": value for name, value in baseline_acc.compute().items() if name != "users"})
    return metrics

