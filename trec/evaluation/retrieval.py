"""Retrieval evaluation: full-catalog top-K for every evaluated user, distributed across ranks.

1. Each rank encodes a disjoint slice of the catalog with the item tower; the slices are summed
   across ranks into the full ``I X D`` item matrix (tables stay model-parallel: every rank
   takes part in every embedding lookup).
2. Each rank encodes a disjoint slice of the evaluated users with the user tower (their whole
   training history as input), scores them against every item, removes the items the user
   already has in training (every training interaction, whatever its label: the user has seen
   it), and takes the top K.
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
import torch.distributed as dist

from trec.config import DataConfig, EvaluationConfig, Gain
from trec.data import PreparedDataset, RecBatch, gather_ranges, iter_index_batches
from trec.distributed import DistContext
from trec.errors import TrecError
from trec.metrics import RankingAccumulator, graded_gain, ideal_gains, topk_gains, topk_hits

logger = logging.getLogger("trec")

# Scores of at most this many (user, item) pairs are materialised at once.
SCORE_CHUNK_ELEMENTS = 1 << 25


def csr_pairs(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (row position, value) pairs of the CSR rows ``rows``, vectorised.

    Returns (positions, values) where positions index into ``rows``.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return np.repeat(np.arange(len(rows)), lengths), gather_ranges(values, starts, lengths)


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
    if dist.is_initialized() and ctx.world_size > 1:
        dist.all_reduce(table)  # each row was filled by exactly one rank
    return table


def evaluated_users(dataset: PreparedDataset, split: str, max_users: int, seed: int) -> tuple[np.ndarray, tuple]:
    """Users with at least one positive in ``split`` (optionally a seeded sample) and the CSR of
    the split's positives (label >= the dataset's positive_threshold): the relevant items."""
    offsets, items = dataset.user_items([split], positives=True)
    users = np.flatnonzero(np.diff(offsets) > 0)
    if 0 < max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users, (offsets, items)


def _keys(positions: np.ndarray, values: np.ndarray, num_items: int, device) -> torch.Tensor:
    return torch.as_tensor(np.sort(positions * num_items + values), device=device)


def graded_truth(offsets: np.ndarray, labels: np.ndarray, rows: np.ndarray, k: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Graded gains ``2^label - 1`` of the relevant items of ``rows``: (P,) aligned with the sorted
    keys of :func:`_keys` (the CSR's items are sorted per user) and U X k ideal gains."""
    positions, row_labels = csr_pairs(offsets, labels, rows)
    gains = graded_gain(torch.as_tensor(row_labels, device=device))
    return gains, ideal_gains(torch.as_tensor(positions, device=device), gains, len(rows), k)


def score_topk(scores: torch.Tensor, exclude_keys: torch.Tensor | None, k: int) -> torch.Tensor:
    """Top-k item indices per row of ``U X I`` scores after removing the excluded (row, item) keys;
    -1 where fewer than k items remain (an excluded item is never listed, not even as a filler)."""
    if exclude_keys is not None and exclude_keys.numel():
        scores = scores.clone()
        scores.view(-1)[exclude_keys] = -torch.inf
    top = scores.topk(k, dim=1)
    return top.indices.masked_fill(torch.isneginf(top.values), -1)


# A ranker turns U X D user embeddings into U X k item indices (-1 where it has fewer than k),
# never returning an excluded key ``row * num_items + item`` of those U rows.
Ranker = Callable[[torch.Tensor, "torch.Tensor | None", int], torch.Tensor]


def exact_ranker(item_table: torch.Tensor) -> Ranker:
    """Brute-force inner product against the whole ``I X D`` catalog."""
    return lambda users, excluded, k: score_topk(users @ item_table.T, excluded, k)


def popularity_ranker(item_counts: torch.Tensor) -> Ranker:
    """The baseline: items by (positive) training count, whoever the user is."""
    return lambda users, excluded, k: score_topk(item_counts.expand(users.shape[0], -1), excluded, k)


def search_excluding(index, queries: torch.Tensor, excluded: torch.Tensor | None, k: int,
                     num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a :class:`trec.export.ShardedIndex` for U X D queries, never an excluded key.

    ``excluded`` holds sorted keys ``row * num_items + item``; the index is asked for k plus the
    largest excluded count of a row, so k results remain after filtering.
    Returns (U X k item indices, U X k scores), padded with -1 / -inf where fewer remain.
    """
    rows = torch.arange(queries.shape[0], device=queries.device)[:, None]
    extra = int(torch.bincount(excluded // num_items).max().item()) if excluded is not None and excluded.numel() else 0
    found = index.search(queries.float().cpu().numpy(), k + extra)
    items = torch.as_tensor(found.item_indices, device=queries.device)
    scores = torch.as_tensor(found.scores, device=queries.device)
    dropped = items < 0
    if extra:
        dropped |= torch.isin(rows * num_items + items, excluded)
    # A stable sort moves the kept results first, in the index's order.
    order = torch.sort(dropped.to(torch.int8), dim=1, stable=True).indices[:, :k]
    missing = torch.gather(dropped, 1, order)
    return (torch.gather(items, 1, order).masked_fill(missing, -1),
            torch.gather(scores, 1, order).masked_fill(missing, -torch.inf))


def index_ranker(index, num_items: int) -> Ranker:
    """Rank through a :class:`trec.export.ShardedIndex` instead of exact search."""
    return lambda users, excluded, k: search_excluding(index, users, excluded, k, num_items)[0]


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
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return {f"ann_recall@{k}": (sums[i] / sums[-1].clamp_min(1)).item() for i, k in enumerate(self.ks)}


def check_cutoffs(ks: Sequence[int], dataset: PreparedDataset) -> None:
    """Refuse (one line) a top-K cut-off beyond the catalog: its metrics would silently be of fewer items."""
    too_large = [k for k in ks if k > dataset.num_items]
    if too_large:
        raise TrecError(f"evaluation.ks: k={max(too_large)} exceeds the catalog of {dataset.num_items} items of "
                        f"{dataset.path}; use cut-offs of at most {dataset.num_items}")


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
    users, (truth_offsets, truth_items) = evaluated_users(dataset, split, cfg.max_users, seed)
    truth_labels = dataset.user_positive_labels(split)[2] if cfg.gain == Gain.graded else None
    exclusions = dataset.user_items(list(exclude_splits)) if cfg.exclude_train and exclude_splits else None
    rankers = {"": exact_ranker(item_table)}
    if cfg.popularity_baseline:
        rankers["popularity/"] = popularity_ranker(torch.as_tensor(dataset.item_counts, dtype=torch.float32,
                                                                   device=ctx.device))
    if index is not None:
        rankers["index/"] = index_ranker(index, num_items)
        ann = AnnRecall(cfg.ks, ctx.device)
    accumulators = {prefix: RankingAccumulator(cfg.ks, num_items, ctx.device) for prefix in rankers}
    for selected, batch in entity_batches(dataset, users, "user", data_cfg.eval_batch_size, ctx, data_cfg.history_max_len):
        real = selected >= 0
        embeddings = user_encoder(batch)[torch.as_tensor(real, device=ctx.device)]
        batch_users = selected[real]
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(num_items, 1))
        for start in range(0, len(batch_users), chunk):
            rows = batch_users[start : start + chunk]
            queries = embeddings[start : start + chunk]
            relevant = _keys(*csr_pairs(truth_offsets, truth_items, rows), num_items, ctx.device)
            num_relevant = torch.as_tensor(np.diff(truth_offsets)[rows], device=ctx.device)
            graded = None
            if truth_labels is not None:
                graded = graded_truth(truth_offsets, truth_labels, rows, max_k, ctx.device)
            excluded = None
            if exclusions is not None:
                excluded = _keys(*csr_pairs(exclusions[0], exclusions[1], rows), num_items, ctx.device)
            for prefix, ranker in rankers.items():
                top = ranker(queries, excluded, max_k)
                gains = None if graded is None else topk_gains(top, relevant, graded[0], num_items)
                accumulators[prefix].add(top, topk_hits(top, relevant, num_items), num_relevant, item_table,
                                         gains, None if graded is None else graded[1])
            if index is not None:
                ann.add(rankers["index/"](queries, None, max_k), rankers[""](queries, None, max_k))
    metrics = {}
    for prefix, accumulator in accumulators.items():
        metrics.update({prefix + name: value for name, value in accumulator.compute().items()
                        if not (prefix and name == "users")})
    if index is not None:
        metrics.update({f"index/{name}": value for name, value in ann.compute().items()})
    return metrics
