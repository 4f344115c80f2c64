"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): the closed-form item-item baseline.

``B = I - P · diag(1 / diag(P))`` with ``P = (XᵀX + λI)⁻¹``, X the binary U X I matrix of the
training split's positive rows (label >= the dataset's positive_threshold), so diag(B) = 0: an
item never explains itself. A user's scores are ``X_u · B``, i.e. the user vectors X ranked
against the item vectors Bᵀ by :func:`~trec.evaluation.topk.exact_topk`, through the same
evaluation code (exclusions, :class:`~trec.metrics.RankingAccumulator`) as every trec model.

λ is chosen on an internal validation set carved from each user's training positives (seeded,
about 10% per user, at least one kept for fitting), by NDCG@10, then B is refit on all of train.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from data_pipeline.layout import USER_ID
from trec.config import DataConfig, EvaluationConfig
from trec.data import Csr, PreparedDataset, RecBatch, pair_key
from trec.data.managed import CatalogIndex, catalog_index
from trec.distributed import DistContext
from trec.errors import TrecError
from trec.evaluation.retrieval import evaluate_retrieval
from trec.evaluation.topk import SCORE_CHUNK_ELEMENTS, exact_topk, exclusion_keys
from trec.metrics import RankingAccumulator, topk_hits

MAX_ITEMS = 30_000
"""Largest catalog EASE accepts: its I X I float32 matrices (XᵀX, its inverse, B) grow as I²."""
LAMBDA_GRID = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
VALIDATION_FRACTION = 0.1


def check_catalog(num_items: int) -> None:
    """Refuse (one line) a catalog whose I X I matrices would not fit."""
    if num_items > MAX_ITEMS:
        gib = 3 * num_items**2 * 4 / 2**30
        raise TrecError(f"EASE: the catalog has {num_items:,} items, above the limit of {MAX_ITEMS:,} "
                        f"(it needs three {num_items:,} x {num_items:,} float32 matrices, {gib:.0f} GiB); "
                        "leave ease out of --methods for this dataset")


def binary_matrix(positives: Csr, num_items: int) -> torch.Tensor:
    """The U X I float32 0/1 matrix of a user → items Csr."""
    rows = np.repeat(np.arange(positives.num_rows), positives.lengths)
    x = torch.zeros(positives.num_rows, num_items)
    x[torch.tensor(rows), torch.tensor(positives.values)] = 1.0
    return x


def ease_weights(x: torch.Tensor, lam: float) -> torch.Tensor:
    """The I X I EASE matrix B of a U X I binary matrix ``x`` (diag(B) = 0)."""
    check_catalog(x.shape[1])
    gram = x.T @ x
    gram.diagonal().add_(lam)
    p = torch.linalg.inv(gram)  # symmetric positive definite for lam > 0
    b = -p / p.diagonal()[None, :]  # I - P · diag(1/diag(P)) off the diagonal
    b.diagonal().zero_()
    return b


def carve_validation(positives: Csr, num_items: int, seed: int,
                     fraction: float = VALIDATION_FRACTION) -> tuple[Csr, Csr]:
    """(fit, held out): per user a seeded random ceil(fraction · n) of their n positives held out,
    at most n - 1 (a user keeps at least one item to be scored from)."""
    lengths = positives.lengths
    rows = np.repeat(np.arange(positives.num_rows), lengths)
    # Rounded first: 20 · 0.1 may come out a hair above 2 and ceil to 3.
    held_count = np.minimum(np.ceil(np.round(lengths * fraction, 9)).astype(np.int64), np.maximum(lengths - 1, 0))
    order = np.lexsort((np.random.default_rng(seed).random(len(rows)), rows))  # shuffled within each user
    rank_in_row = np.arange(len(rows)) - positives.offsets[rows[order]]
    held = np.zeros(len(rows), bool)
    held[order] = rank_in_row < held_count[rows[order]]
    keys = pair_key(rows, positives.values, num_items)
    return (Csr.from_keys(np.sort(keys[~held]), positives.num_rows, num_items),
            Csr.from_keys(np.sort(keys[held]), positives.num_rows, num_items))


def ranking_metrics_of(b: torch.Tensor, x: torch.Tensor, truth: Csr, exclusions: Csr, k: int,
                       device: torch.device) -> dict[str, float]:
    """Top-k metrics of EASE (U X I user vectors ``x``, I X I ``b``) on the users with a ``truth`` item,
    their ``exclusions`` never recommended: exact_topk and RankingAccumulator, as evaluate_retrieval."""
    num_items = b.shape[0]
    source = exact_topk(b.T.to(device))
    users = np.flatnonzero(truth.lengths > 0)
    accumulator = RankingAccumulator([k], num_items, device)
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(num_items, 1))
    for start in range(0, len(users), chunk):
        rows = users[start : start + chunk]
        top = source(x[torch.as_tensor(rows)].to(device), exclusion_keys(exclusions, rows, num_items, device), k)[0]
        relevant = torch.as_tensor(truth.keys(rows, num_items), device=device)
        accumulator.add(top, topk_hits(top, relevant, num_items), torch.as_tensor(truth.lengths[rows], device=device))
    return accumulator.compute()


def choose_lambda(positives: Csr, seen: Csr, num_items: int, seed: int, grid: Sequence[float] = LAMBDA_GRID,
                  k: int = 10, device: torch.device = torch.device("cpu")) -> tuple[float, dict[float, float]]:
    """(the λ of ``grid`` with the best validation NDCG@k, NDCG@k of each λ).

    ``positives``: each user's training positives, of which :func:`carve_validation` holds some out;
    ``seen``: each user's training items of any label, never recommended except the held-out ones.
    """
    fit, held = carve_validation(positives, num_items, seed)
    held_keys = held.all_keys(num_items)
    seen_keys = seen.all_keys(num_items)
    exclusions = Csr.from_keys(seen_keys[~np.isin(seen_keys, held_keys)], seen.num_rows, num_items)
    x = binary_matrix(fit, num_items).to(device)
    scores = {float(lam): ranking_metrics_of(ease_weights(x, lam), x, held, exclusions, k, device)[f"ndcg@{k}"]
              for lam in grid}
    return max(scores, key=scores.get), scores


def user_vectors(x: torch.Tensor, to_catalog: CatalogIndex | None = None) -> Callable[[RecBatch], torch.Tensor]:
    """A user encoder for :func:`evaluate_retrieval`: batch → R X I rows of ``x`` (zeros on padding rows).

    ``to_catalog``: for managed user IDs, the batch's managed IDs → the catalog indices that key ``x``'s rows.
    """

    def encode(batch: RecBatch) -> torch.Tensor:
        ids = batch.sparse_features["user_id"]
        present = ids.lengths() > 0
        users = ids.values().to(x.device)
        if to_catalog is not None:
            users = to_catalog(users)
        out = torch.zeros(len(present), x.shape[1], device=ids.values().device)
        out[present] = x[users].to(out.device)
        return out

    return encode


def evaluate_ease(dataset: PreparedDataset, split: str, exclude_splits: Sequence[str], cfg: EvaluationConfig,
                  data_cfg: DataConfig, ctx: DistContext, seed: int,
                  grid: Sequence[float] = LAMBDA_GRID) -> dict[str, float]:
    """Choose λ on the carved validation set, refit on all of train, evaluate on ``split`` with
    :func:`evaluate_retrieval` (its ``popularity/`` keys included). Adds ``lambda`` (the chosen one)
    and ``val/ndcg@10/lambda=L`` (each of the grid)."""
    check_catalog(dataset.num_items)
    positives = dataset.user_items(["train"], positives=True)
    lam, scores = choose_lambda(positives, dataset.user_items(["train"]), dataset.num_items, seed, grid,
                                device=ctx.device)
    x = binary_matrix(positives, dataset.num_items).to(ctx.device)
    b = ease_weights(x, lam)
    to_catalog = catalog_index(dataset, USER_ID)  # managed user IDs: the batches carry hashes, x is keyed by catalog
    if to_catalog is not None:
        to_catalog.to(x.device)
    metrics = evaluate_retrieval(user_vectors(x, to_catalog), b.T, dataset, split, exclude_splits, cfg, data_cfg, ctx,
                                 seed)
    metrics["lambda"] = lam
    metrics.update({f"val/ndcg@10/lambda={g:g}": v for g, v in scores.items()})
    return metrics

