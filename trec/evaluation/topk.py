"""Top-k sources: the one abstraction that turns user queries into their best items.

A :data:`TopK` source maps ``U X D`` queries (user embeddings), the sorted keys of the (row, item)
pairs that must not be returned (:func:`exclusion_keys`) and k to the ``U X k`` best items with
their scores. Retrieval evaluation, two-stage candidate generation, hard-negative mining and
``trec search`` all rank through one:

- :func:`exact_topk`: brute-force inner products against the whole ``I X D`` catalog;
- :func:`popularity_topk`: the baseline, items by training count whoever the user is;
- :func:`index_topk`: a FAISS export (:class:`trec.export.ShardedIndex`), approximate or not.

An excluded item is never returned, not even as a filler of a row with fewer than k eligible
items: such a row is padded with item -1 and score -inf.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from trec.data import Csr, key_rows, pair_key

# Scores of at most this many (user, item) pairs are materialised at once.
SCORE_CHUNK_ELEMENTS = 1 << 25

TopK = Callable[[torch.Tensor, "torch.Tensor | None", int], tuple[torch.Tensor, torch.Tensor]]
"""(U X D queries, sorted excluded keys ``pair_key(row, item, num_items)`` of those U rows or None,
k) → (U X k item indices, best first, -1 padding; U X k scores, -inf padding)."""


def exclusion_keys(exclusions: Csr | None, users: np.ndarray, num_items: int,
                   device: torch.device) -> torch.Tensor | None:
    """Sorted keys ``pair_key(position, item, num_items)`` of the items each of ``users`` (U,) must not
    get (a user → items Csr; row -1, padding, excludes nothing); None without exclusions."""
    if exclusions is None:
        return None
    return torch.as_tensor(exclusions.keys(users, num_items), device=device)


def score_topk(scores: torch.Tensor, exclude_keys: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``U X I`` scores after removing the excluded (row, item) keys: (U X k item indices,
    U X k scores), -1 / -inf where fewer than k items remain. ``scores`` is left as it was."""
    if exclude_keys is not None and exclude_keys.numel():
        scores = scores.clone()
    return _masked_topk(scores, exclude_keys, k)


def _masked_topk(scores: torch.Tensor, exclude_keys: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_topk` that overwrites ``scores`` (a tensor of its own) with -inf at the excluded keys."""
    if exclude_keys is not None and exclude_keys.numel():
        scores.view(-1)[exclude_keys] = -torch.inf
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    items, values = top.indices, top.values
    if items.shape[1] < k:  # a catalog smaller than k
        pad = k - items.shape[1]
        items = torch.nn.functional.pad(items, (0, pad), value=-1)
        values = torch.nn.functional.pad(values, (0, pad), value=-torch.inf)
    return items.masked_fill(torch.isneginf(values), -1), values


def _chunked(score: Callable[[torch.Tensor], torch.Tensor], num_items: int) -> TopK:
    """A top-k source over ``score(U' X D queries) -> U' X I`` (a new tensor), computed for at most
    :data:`SCORE_CHUNK_ELEMENTS` (user, item) pairs at a time."""

    def topk(queries: torch.Tensor, excluded: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = max(1, SCORE_CHUNK_ELEMENTS // max(num_items, 1))
        if queries.shape[0] <= chunk:
            return _masked_topk(score(queries), excluded, k)
        items, values = [], []
        for start in range(0, queries.shape[0], chunk):
            keys = None
            if excluded is not None:
                # This chunk's keys, renumbered from its first row.
                bounds = torch.tensor([start, start + chunk], device=excluded.device) * num_items
                low, high = torch.searchsorted(excluded, bounds).tolist()
                keys = excluded[low:high] - start * num_items
            found, found_scores = _masked_topk(score(queries[start : start + chunk]), keys, k)
            items.append(found)
            values.append(found_scores)
        return torch.cat(items), torch.cat(values)

    return topk


def exact_topk(item_table: torch.Tensor) -> TopK:
    """Brute-force inner products against the whole ``I X D`` catalog."""
    return _chunked(lambda queries: queries @ item_table.T, item_table.shape[0])


def popularity_topk(item_counts: torch.Tensor) -> TopK:
    """The baseline: items by their (I,) (positive) training count, whoever the user is."""
    return _chunked(lambda queries: item_counts.expand(queries.shape[0], -1).clone(), item_counts.shape[0])


def search_excluding(index, queries: torch.Tensor, excluded: torch.Tensor | None, k: int,
                     num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a :class:`trec.export.ShardedIndex` for U X D queries, never an excluded key.

    ``excluded`` holds sorted keys ``pair_key(row, item, num_items)``; the index is asked for k plus the
    largest excluded count of a row, so k results remain after filtering.
    Returns (U X k item indices, U X k scores), padded with -1 / -inf where fewer remain.
    """
    rows = torch.arange(queries.shape[0], device=queries.device)[:, None]
    extra = 0
    if excluded is not None and excluded.numel():
        extra = int(torch.bincount(key_rows(excluded, num_items)).max().item())
    found = index.search(queries.float().cpu().numpy(), k + extra)
    items = torch.as_tensor(found.item_indices, device=queries.device)
    scores = torch.as_tensor(found.scores, device=queries.device)
    dropped = items < 0
    if extra:
        dropped |= torch.isin(pair_key(rows, items, num_items), excluded)
    # A stable sort moves the kept results first, in the index's order.
    order = torch.sort(dropped.to(torch.int8), dim=1, stable=True).indices[:, :k]
    missing = torch.gather(dropped, 1, order)
    return (torch.gather(items, 1, order).masked_fill(missing, -1),
            torch.gather(scores, 1, order).masked_fill(missing, -torch.inf))


def index_topk(index, num_items: int) -> TopK:
    """Rank through a :class:`trec.export.ShardedIndex` of the catalog's ``num_items`` items."""
    return lambda queries, excluded, k: search_excluding(index, queries, excluded, k, num_items)
