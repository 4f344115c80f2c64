"""Ranking (click model) evaluation: a ranker's click metrics on held-out rows plus sampled negatives.

The rows of a split (positives, and its non-positive rows as negatives) are followed by
``eval_negatives`` negatives per positive, sampled with a fixed seed so every rank, every world
size and every model sees the same rows (:func:`held_out_rows`). Each rank scores a disjoint
slice with the model's scoring callable, and :class:`trec.metrics.ClickMetrics` gathers auc,
logloss, ne, calibration (and rating_mse). With hard candidates (a ranker trained on a
retriever's), ``hard_auc`` ranks the same positives against negatives from their user's
candidates: how well the ranker orders what the retriever proposes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from data_pipeline import layout as L
from trec.config import DataConfig
from trec.data import Csr, PreparedDataset, RecBatch, iter_index_batches
from trec.distributed import DistContext
from trec.metrics import ClickMetrics
from trec.negatives import RankingNegativeSampler

ClickScorer = Callable[[RecBatch], "tuple[torch.Tensor, torch.Tensor | None]"]
"""batch of R rows → (R click logits, R predicted ratings or None). Collective (sharded lookups)."""


def held_out_rows(dataset: PreparedDataset, split: str, eval_negatives: int, eval_seed: int,
                  hard: Csr | None = None) -> tuple[np.ndarray, ...]:
    """(users, items, click labels, ratings) of the split's rows, then ``eval_negatives`` negatives
    per positive row (positive-major order).

    A row's click label is 1 when its label is >= the dataset's positive_threshold, else 0: a
    held-out non-positive row is a negative beside the sampled ones.

    Negatives avoid every item the user has in any split and come from one generator seeded by
    ``eval_seed``: the rows are identical on every rank, for every world size and every model.
    They are uniform over the catalog, or with ``hard`` (a user → items CSR) drawn from the
    user's hard candidates; then only the positive rows are kept (``hard_auc`` ranks the
    positives against their hard candidates, not against the held-out non-positive rows).
    """
    columns = [L.USER_ID, L.ITEM_ID, L.LABEL] + ([L.RATING] if dataset.has_rating else [])
    table = dataset.read_split(split, columns)
    users = table[L.USER_ID].to_numpy().astype(np.int64)
    items = table[L.ITEM_ID].to_numpy().astype(np.int64)
    labels = table[L.LABEL].to_numpy().astype(np.float32)
    ratings = table[L.RATING].to_numpy().astype(np.float32) if dataset.has_rating else np.zeros(len(users), np.float32)
    if hard is not None:
        positive = labels >= dataset.positive_threshold
        users, items, labels, ratings = users[positive], items[positive], labels[positive], ratings[positive]
    known = dataset.user_items([s for s in L.SPLITS if dataset.has_split(s)])
    sampler = RankingNegativeSampler(known, dataset.num_items, eval_negatives, 0.0 if hard is None else 1.0,
                                     dataset.positive_threshold)
    if hard is not None:
        sampler.set_hard_candidates(hard)
    return sampler(users, items, labels, ratings, np.random.default_rng(eval_seed), pad=False)


@torch.no_grad()
def score_rows(score: ClickScorer, has_rating: bool, dataset: PreparedDataset, rows: tuple[np.ndarray, ...],
               data_cfg: DataConfig, ctx: DistContext) -> dict[str, float]:
    """:class:`~trec.metrics.ClickMetrics` of ``score`` on labelled rows (rating_mse when
    ``has_rating``); each rank scores a disjoint slice (collective)."""
    users, items, labels, ratings = rows
    per_rank = -(-len(users) // ctx.world_size)
    metrics = ClickMetrics(ctx.world_size, ctx.rank, per_rank, has_rating, ctx.device)
    for positions in iter_index_batches(len(users), data_cfg.eval_batch_size, ctx.rank, ctx.world_size):
        real = positions >= 0
        index = np.where(real, positions, 0)
        batch = dataset.build_batch(np.where(real, users[index], -1), np.where(real, items[index], -1), labels[index],
                                    ratings[index], history_max_len=data_cfg.history_max_len).to(ctx.device)
        logits, predicted = score(batch)
        keep = torch.as_tensor(real, device=ctx.device)
        metrics.update(logits[keep], batch.labels[keep], None if predicted is None else predicted[keep],
                       batch.ratings[keep])
    return metrics.compute()


@torch.no_grad()
def evaluate_ranking(score: ClickScorer, has_rating: bool, dataset: PreparedDataset, split: str,
                     data_cfg: DataConfig, ctx: DistContext, eval_negatives: int, eval_seed: int,
                     hard: Csr | None = None) -> dict[str, float]:
    """auc, logloss, ne, calibration (and rating_mse) on the split's rows (positives, and its
    non-positive rows as negatives) and uniform negatives sampled per positive.

    With ``hard`` (the user → items hard candidates the ranker trained with), ``hard_auc`` is the
    AUC of the same positives against negatives from their user's hard candidates. No split's
    items are excluded: negatives avoid all of the user's items.
    """
    rows = held_out_rows(dataset, split, eval_negatives, eval_seed)
    metrics = score_rows(score, has_rating, dataset, rows, data_cfg, ctx)
    if hard is not None:
        rows = held_out_rows(dataset, split, eval_negatives, eval_seed, hard)
        metrics["hard_auc"] = score_rows(score, has_rating, dataset, rows, data_cfg, ctx)["auc"]
    return metrics
