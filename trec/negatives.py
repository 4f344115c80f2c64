"""Samplers that add negative candidates to a training batch (run in the reader's prefetch thread).

The two-tower task appends N *item-only* rows (user index -1) after the B labelled rows; their
item embeddings become extra softmax candidates shared by the whole batch. The ranker appends
*full* (same user, negative item) rows with label 0 instead (:class:`RankingNegativeSampler`),
k per positive row (label >= data.positive_threshold).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.layout import DEFAULT_POSITIVE_THRESHOLD
from trec.data.csr import Csr, pair_key


# Click target of a row the ranker's loss ignores: the sampled rows of a non-positive row, which
# keep every training batch at B * (1 + k) rows (ranks must see equal shapes).
IGNORED_LABEL = -1.0


def click_labels(labels: np.ndarray, positive_threshold: float) -> np.ndarray:
    """(B,) float32 click targets of labelled rows: 1 where label >= the threshold, else 0."""
    return (np.asarray(labels) >= positive_threshold).astype(np.float32)


def popularity_distribution(item_counts: np.ndarray) -> np.ndarray:
    """(I,) probability of each item being a training positive (add-one smoothed)."""
    counts = item_counts.astype(np.float64) + 1.0
    return counts / counts.sum()


class ExtraItemSampler:
    """Draws the N extra candidate items of each batch: uniform, by popularity (``popular_share``
    of them on average), or a blend.

    ``probability`` is the per-draw distribution, used by the loss for logQ correction; the
    ``hard`` strategy draws uniformly and lets the loss keep each row's highest-scored ones.
    """

    def __init__(self, item_counts: np.ndarray, num_extra: int, popular_share: float = 0.0) -> None:
        num_items = len(item_counts)
        uniform = np.full(num_items, 1.0 / num_items)
        popular = popularity_distribution(item_counts)
        self.probability = (1.0 - popular_share) * uniform + popular_share * popular
        self.num_extra = num_extra
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


# --------------------------------------------------------------------------------------------
# ranking: full (user, negative item) rows
# --------------------------------------------------------------------------------------------


class RankingNegativeSampler:
    """Reader hook of the ranker: appends ``k`` full (same user, negative item) rows per positive.

    A negative is never one of the user's ``known`` items (the training interactions, so never
    the positive itself). Of the k, ``round(k * hard_ratio)`` are drawn uniformly from the
    user's hard candidates (see :meth:`set_hard_candidates`; a user without any falls back to
    random), the rest uniformly from the catalog. Appended rows have label 0 and rating 0.
    The labelled rows' labels become click targets (1 if label >= ``positive_threshold``, else
    0: a real negative); only positive rows get sampled negatives.

    Args:
        known: user → items Csr of each user's items that must not be negatives.
        num_items: catalog size I.
        positive_threshold: data.positive_threshold.
    """

    # Uniform redraws of a negative that hit a known item; users with nearly the whole
    # catalog known may keep a hit after these (vanishingly rare, and harmless).
    _REDRAWS = 8

    def __init__(self, known: Csr, num_items: int, per_positive: int,
                 hard_ratio: float = 0.0,
                 positive_threshold: float = DEFAULT_POSITIVE_THRESHOLD,
                 popular_ratio: float = 0.0, item_counts: np.ndarray | None = None) -> None:
        self.num_items = num_items
        self.positive_threshold = positive_threshold
        self.per_positive = per_positive
        self.num_hard = int(round(per_positive * hard_ratio))
        self.num_popular = min(int(round(per_positive * popular_ratio)), per_positive - self.num_hard)
        self._known = known.all_keys(num_items)
        self._hard: Csr | None = None
        self._popular_cdf = None
        if self.num_popular:  # P(item) ∝ its positive train rows, +1 so that no item is impossible
            weights = np.asarray(item_counts, np.float64) + 1.0
            self._popular_cdf = np.cumsum(weights) / weights.sum()

    def set_hard_candidates(self, candidates: Csr) -> None:
        """Per-user hard candidates (a user → items Csr); known ones are skipped."""
        self._hard = Csr(np.asarray(candidates.offsets, np.int64), np.asarray(candidates.values, np.int64))

    @property
    def hard_candidates(self) -> Csr | None:
        return self._hard

    def is_known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = pair_key(users, items, self.num_items)
        where = np.minimum(np.searchsorted(self._known, keys), max(len(self._known) - 1, 0))
        return self._known[where] == keys if len(self._known) else np.zeros(len(keys), bool)

    def random(self, users: np.ndarray, rng: np.random.Generator, popular: bool = False) -> np.ndarray:
        """(len(users),) items not known for their user: uniform, or (``popular``) by training popularity."""
        def draw(count: int) -> np.ndarray:
            if not popular:
                return rng.integers(0, self.num_items, count, dtype=np.int64)
            return np.minimum(np.searchsorted(self._popular_cdf, rng.random(count), side="right"), self.num_items - 1)

        items = draw(len(users))
        for _ in range(self._REDRAWS):
            hits = np.flatnonzero(self.is_known(users, items))
            if len(hits) == 0:
                break
            items[hits] = draw(len(hits))
        return items

    def hard(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(len(users),) items drawn uniformly from each user's hard candidates that are not known
        for the user (random if there are none, or if redraws keep hitting known ones)."""
        offsets, candidates = self._hard.offsets, self._hard.values
        starts = offsets[users]
        counts = offsets[users + 1] - starts
        last = max(len(candidates) - 1, 0)

        def draw(rows: np.ndarray) -> np.ndarray:
            picks = starts[rows] + (rng.random(len(rows)) * counts[rows]).astype(np.int64)
            return candidates[np.minimum(picks, last)] if len(candidates) else picks

        items = draw(np.arange(len(users)))
        pending = np.flatnonzero((counts == 0) | self.is_known(users, items))
        for _ in range(self._REDRAWS):
            pending = pending[counts[pending] > 0]
            if len(pending) == 0:
                break
            items[pending] = draw(pending)
            pending = pending[self.is_known(users[pending], items[pending])]
        fallback = np.flatnonzero((counts == 0) | self.is_known(users, items))
        items[fallback] = self.random(users[fallback], rng)
        return items

    def negatives(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(len(users) X k) negative items for each row's user: hard columns first, then popular, then uniform."""
        num_hard = self.num_hard if self._hard is not None else 0
        popular_end = num_hard + self.num_popular
        repeated = np.repeat(users, self.per_positive).reshape(len(users), self.per_positive)
        out = np.empty_like(repeated)
        if num_hard:
            out[:, :num_hard] = self.hard(repeated[:, :num_hard].reshape(-1), rng).reshape(len(users), num_hard)
        if self.num_popular:
            out[:, num_hard:popular_end] = self.random(repeated[:, num_hard:popular_end].reshape(-1), rng,
                                                       popular=True).reshape(len(users), -1)
        out[:, popular_end:] = self.random(repeated[:, popular_end:].reshape(-1), rng).reshape(len(users), -1)
        return out

    def history_rows(self, labelled: int) -> np.ndarray:
        """(B + B * k,) for a training batch of B labelled rows: the labelled row whose history each row
        reads. A sampled row reads its positive's history (without the positive's item, as the
        positive does): with the whole history, the one item missing from a positive's would tell
        positives from negatives, a cue that no candidate carries when ranking."""
        rows = np.arange(labelled)
        return np.concatenate([rows, np.repeat(rows, self.per_positive)])

    def __call__(self, users, items, labels, ratings, rng: np.random.Generator, pad: bool = True):
        """Reader hook: the B rows with click targets, then B * k sampled rows (positive-major order).

        The k rows of a non-positive row are padding with label ``IGNORED_LABEL`` (training
        batches keep one shape); with ``pad=False`` they are left out instead (evaluation rows).
        """
        clicks = click_labels(labels, self.positive_threshold)
        if self.per_positive <= 0:
            return users, items, clicks, ratings
        owners = users if pad else users[clicks > 0]
        negatives = self.negatives(owners, rng).reshape(-1)
        sampled = np.zeros(len(negatives), dtype=np.float32)
        if pad:
            sampled[np.repeat(clicks == 0, self.per_positive)] = IGNORED_LABEL
        return (
            np.concatenate([users, np.repeat(owners, self.per_positive)]),
            np.concatenate([items, negatives]),
            np.concatenate([clicks, sampled]),
            np.concatenate([ratings, np.zeros(len(negatives), dtype=np.float32)]),
        )
