"""Samplers that add negative candidates to a training batch (run in the reader's prefetch thread).

The two-tower task appends N *item-only* rows (user index -1) after the B labelled rows; their
item embeddings become extra softmax candidates shared by the whole batch.
"""

from __future__ import annotations

import numpy as np

from trec.config import NegativeStrategy, RetrievalLossConfig


def popularity_distribution(item_counts: np.ndarray) -> np.ndarray:
    """(I,) probability of each item being a training positive (add-one smoothed)."""
    counts = item_counts.astype(np.float64) + 1.0
    return counts / counts.sum()


class ExtraItemSampler:
    """Draws the N extra candidate items of each batch: uniform, by popularity, or a blend.

    ``probability`` is the per-draw distribution, used by the loss for logQ correction; the
    ``hard`` strategy draws uniformly and lets the loss keep each row's highest-scored ones.
    """

    def __init__(self, cfg: RetrievalLossConfig, item_counts: np.ndarray) -> None:
        num_items = len(item_counts)
        uniform = np.full(num_items, 1.0 / num_items)
        popular = popularity_distribution(item_counts)
        share = {NegativeStrategy.popular: 1.0, NegativeStrategy.mixed: cfg.mix_popular}.get(cfg.negatives, 0.0)
        self.probability = (1.0 - share) * uniform + share * popular
        self.num_extra = 0 if cfg.negatives == NegativeStrategy.none else cfg.num_negatives
        self._cdf = np.cumsum(self.probability)
        self._cdf /= self._cdf[-1]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """(N,) int64 item indices drawn from ``probability`` (with replacement)."""
        return np.searchsorted(self._cdf, rng.random(self.num_extra), side="right").astype(np.int64)

    def __call__(self, users, items, labels, ratings, rng: np.random.Generator):
        """Reader hook: append N item-only rows (user -1) after the labelled rows."""
        if self.num_extra == 0:
            return users, items, labels, ratings
        extra = self.sample(rng)
        users = np.concatenate([users, np.full(len(extra), -1, dtype=np.int64)])
        items = np.concatenate([items, extra])
        return users, items, labels, ratings
