"""Exact (brute-force) inner-product top-k and the ANN recall of an index against it."""

from __future__ import annotations

import numpy as np
import torch


def exact_topk(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    ids: np.ndarray | None = None,
    query_chunk: int = 1024,
    vector_chunk: int = 262_144,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries @ vectors.T`` by inner product: ``(ids N X k int64, scores N X k float32)``.

    ``queries`` is N X D, ``vectors`` M X D; ``ids`` (M,) maps a row of ``vectors`` to the id
    returned (default: the row number). Scores are computed in blocks of ``query_chunk`` x
    ``vector_chunk`` so memory stays bounded for any M. When M < k the tail is padded with id
    -1 and score -inf, like a FAISS search.
    """
    queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    base = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n, m = queries.shape[0], base.shape[0]
    top_scores = np.full((n, k), -np.inf, dtype=np.float32)
    top_rows = np.full((n, k), -1, dtype=np.int64)
    for q0 in range(0, n, query_chunk):
        block = queries[q0 : q0 + query_chunk]
        best_scores = torch.full((block.shape[0], 0), -float("inf"))
        best_rows = torch.empty((block.shape[0], 0), dtype=torch.int64)
        for v0 in range(0, m, vector_chunk):
            scores = block @ base[v0 : v0 + vector_chunk].T  # B X C
            kk = min(k, scores.shape[1])
            s, r = torch.topk(scores, kk, dim=1)
            # Merge this block's best with the running best: the union holds the global top-k.
            merged_scores = torch.cat([best_scores, s], dim=1)
            merged_rows = torch.cat([best_rows, r + v0], dim=1)
            s, pos = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_rows = s, torch.gather(merged_rows, 1, pos)
        found = best_scores.shape[1]
        top_scores[q0 : q0 + len(block), :found] = best_scores.numpy()
        top_rows[q0 : q0 + len(block), :found] = best_rows.numpy()
    if ids is None:
        return top_rows, top_scores
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(top_rows >= 0, ids[np.maximum(top_rows, 0)], -1), top_scores


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """ANN recall@k: mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|.

    Both are N X k id arrays (-1 = padding, ignored); k is their width.
    """
    approx_ids = np.asarray(approx_ids)
    exact_ids = np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"recall_at_k: {approx_ids.shape[0]} approximate rows vs {exact_ids.shape[0]} exact rows")
    valid = exact_ids >= 0
    hits = (exact_ids[:, :, None] == approx_ids[:, None, :]).any(axis=2) & valid  # N X k
    per_query = hits.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return float(per_query[valid.any(axis=1)].mean()) if valid.any() else 1.0
