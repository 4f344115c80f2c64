"""Metrics: top-K ranking metrics and their cross-rank aggregation (TensorBoard: :mod:`trec.logger`).

Ranking metrics follow the definitions of Microsoft's recommenders benchmark (binary gain):
for a user with relevant set R and top-K list L,

- precision@K = |L ∩ R| / K,  recall@K = |L ∩ R| / |R|,  hit@K = [L ∩ R ≠ ∅]
- ndcg@K = Σ_i rel_i / log2(i + 2)  /  Σ_{i < min(|R|, K)} 1 / log2(i + 2)
  (with graded gain, evaluation.gain = graded: gain g = 2^label − 1 of each relevant item, and
  ndcg@K = Σ_i g_i / log2(i + 2) / the same sum over the user's gains sorted descending)
- map@K = Σ_i precision@(i+1) · rel_i / min(|R|, K)
- mrr@K = 1 / (rank of the first relevant item in L), 0 if none
- coverage@K = |∪ L| / |catalog|,  diversity@K = 1 − mean pairwise cosine of the items in L

Per-user values are summed locally and all-reduced, so a distributed evaluation equals a
single-process one.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from trec.data.csr import pair_key
from trec.distributed import dist_max, dist_sum

logger = logging.getLogger("trec")

RANKING_METRICS = ("precision", "recall", "ndcg", "map", "mrr", "hit")


def topk_hits(topk_items: torch.Tensor, relevant_keys: torch.Tensor, num_items: int) -> torch.Tensor:
    """Which recommended items are relevant.

    Args:
        topk_items: U X K item indices (row u = user u's list, best first; -1 = no item).
        relevant_keys: sorted int64 keys ``u * num_items + item`` of every relevant (u, item).
        num_items: catalog size (the key stride).
    Returns:
        U X K bool.
    """
    rows = torch.arange(topk_items.shape[0], device=topk_items.device)[:, None]
    return torch.isin(pair_key(rows, topk_items, num_items), relevant_keys) & (topk_items >= 0)


def graded_gain(labels: torch.Tensor) -> torch.Tensor:
    """Gain ``2^label - 1`` of relevant items with graded labels in [0, 1] (label 1 → gain 1)."""
    return torch.exp2(labels.double()) - 1.0


def topk_gains(topk_items: torch.Tensor, relevant_keys: torch.Tensor, relevant_gains: torch.Tensor,
               num_items: int) -> torch.Tensor:
    """U X K float64 gain of each recommended item (0 where it is not relevant).

    relevant_keys: sorted int64 keys as in :func:`topk_hits`; relevant_gains: their gains, aligned.
    """
    rows = torch.arange(topk_items.shape[0], device=topk_items.device)[:, None]
    keys = pair_key(rows, topk_items, num_items)
    if relevant_keys.numel() == 0:
        return torch.zeros(keys.shape, dtype=torch.float64, device=keys.device)
    where = torch.searchsorted(relevant_keys, keys).clamp_max(relevant_keys.numel() - 1)
    found = (relevant_keys[where] == keys) & (topk_items >= 0)
    return torch.where(found, relevant_gains.double()[where], 0.0)


def ideal_gains(rows: torch.Tensor, gains: torch.Tensor, num_rows: int, k: int) -> torch.Tensor:
    """U X k float64: each row's k largest gains, descending, zero-padded (the ideal ranking).

    rows: (P,) row (0..U-1) of each relevant item; gains: (P,) its gain.
    """
    gains = gains.double()
    by_gain = torch.argsort(-gains, stable=True)
    order = by_gain[torch.argsort(rows[by_gain], stable=True)]
    rows, gains = rows[order], gains[order]  # by row, each row's largest gain first
    starts = torch.searchsorted(rows, torch.arange(num_rows, device=rows.device))
    rank = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    ideal = torch.zeros(num_rows, k, dtype=torch.float64, device=rows.device)
    keep = rank < k
    ideal[rows[keep], rank[keep]] = gains[keep]
    return ideal


def _discounts(k: int, device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, k + 2, device=device, dtype=torch.float64))


def ranking_metrics(hits: torch.Tensor, num_relevant: torch.Tensor, k: int, gains: torch.Tensor | None = None,
                    graded_ideal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-user metrics at cut-off ``k``.

    Args:
        hits: U X K' bool (K' ≥ k), from :func:`topk_hits`.
        num_relevant: (U,) size of each user's relevant set (> 0).
        gains, graded_ideal: graded NDCG: U X K' gains of the listed items (:func:`topk_gains`) and
            U X K'' (K'' ≥ k) the ideal ones (:func:`ideal_gains`); None: binary gain.
    Returns:
        {name: (U,) float64} for the names in ``RANKING_METRICS``.
    """
    hits = hits[:, :k].double()
    relevant = num_relevant.double()
    found = hits.sum(dim=1)
    discounts = _discounts(k, hits.device)
    ideal_len = torch.clamp(num_relevant, max=k)
    ideal = torch.cumsum(discounts, 0)[ideal_len - 1]
    precision_at_i = torch.cumsum(hits, dim=1) / torch.arange(1, k + 1, device=hits.device, dtype=torch.float64)
    first = torch.where(hits.any(dim=1), hits.argmax(dim=1).double() + 1.0, torch.inf)
    if gains is None:
        ndcg = (hits * discounts).sum(dim=1) / ideal
    else:
        best_dcg = (graded_ideal[:, :k] * discounts).sum(dim=1)
        ndcg = (gains[:, :k].double() * discounts).sum(dim=1) / best_dcg.clamp_min(1e-12)
    return {
        "precision": found / k,
        "recall": found / relevant,
        "ndcg": ndcg,
        "map": (precision_at_i * hits).sum(dim=1) / ideal_len.double(),
        "mrr": 1.0 / first,
        "hit": (found > 0).double(),
    }


def intra_list_diversity(topk_items: torch.Tensor, item_embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """(U,) 1 − mean pairwise cosine similarity of each user's top-k item embeddings (I X D)."""
    if k < 2:
        return torch.zeros(topk_items.shape[0], dtype=torch.float64, device=topk_items.device)
    # A missing slot (-1, an index that returned fewer than k) counts as the list's first item.
    listed = torch.where(topk_items[:, :k] >= 0, topk_items[:, :k], topk_items[:, :1])
    vectors = torch.nn.functional.normalize(item_embeddings[listed].double(), dim=-1)
    similarity = vectors @ vectors.transpose(1, 2)  # U X k X k
    off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=1)
    return 1.0 - off_diagonal / (k * (k - 1))


class RankingAccumulator:
    """Sums per-user metrics over batches (and ranks) for several cut-offs."""

    def __init__(self, ks: Sequence[int], num_items: int, device: torch.device) -> None:
        self.ks = sorted(set(ks))
        self.num_items = num_items
        self.device = device
        self.sums = {f"{name}@{k}": torch.zeros((), dtype=torch.float64, device=device)
                     for k in self.ks for name in (*RANKING_METRICS, "diversity")}
        self.users = torch.zeros((), dtype=torch.float64, device=device)
        self.recommended = {k: torch.zeros(num_items, dtype=torch.bool, device=device) for k in self.ks}

    def add(self, topk_items, hits, num_relevant, item_embeddings=None, gains=None, graded_ideal=None) -> None:
        """Add a batch of users: U X K lists, U X K hits, (U,) relevant counts (and for graded NDCG
        U X K gains and U X K ideal gains, see :func:`ranking_metrics`)."""
        self.users += topk_items.shape[0]
        for k in self.ks:
            for name, values in ranking_metrics(hits, num_relevant, k, gains, graded_ideal).items():
                self.sums[f"{name}@{k}"] += values.sum()
            if item_embeddings is not None:
                self.sums[f"diversity@{k}"] += intra_list_diversity(topk_items, item_embeddings, k).sum()
            listed = topk_items[:, :k].reshape(-1)
            self.recommended[k][listed[listed >= 0]] = True

    def compute(self) -> dict[str, float]:
        """Means over every user of every rank (collective when a process group is up)."""
        sums = torch.stack([self.users, *self.sums.values()])
        covered = torch.stack([self.recommended[k] for k in self.ks]).to(torch.uint8)
        dist_sum(sums)
        dist_max(covered)
        users = max(sums[0].item(), 1.0)
        result = {name: value.item() / users for name, value in zip(self.sums, sums[1:])}
        for k, row in zip(self.ks, covered):
            result[f"coverage@{k}"] = row.sum().item() / self.num_items
        result["users"] = sums[0].item()
        return result


class ClickMetrics:
    """Pointwise ranker metrics through ``torchrec.metrics``, aggregated over every rank.

    ``auc``, ``logloss``, ``ne`` (normalised entropy) and ``calibration`` (mean predicted over
    mean observed click rate) of the click probabilities; ``rating_mse`` of the rating head on
    the positive rows when ``rating`` is set. Every rank gets the same values (the states are
    gathered on ``compute``), so decisions taken on them (early stopping) agree across ranks.

    Args:
        max_rows: upper bound of the rows one rank adds (AUC keeps a window of raw predictions:
            it must hold them all).
    """

    def __init__(self, world_size: int, rank: int, max_rows: int, rating: bool, device: torch.device) -> None:
        from torchrec.metrics.auc import AUCMetric
        from torchrec.metrics.calibration import CalibrationMetric
        from torchrec.metrics.metrics_config import RecTaskInfo
        from torchrec.metrics.mse import MSEMetric
        from torchrec.metrics.ne import NEMetric

        click = RecTaskInfo(name="click", label_name="label", prediction_name="click", weight_name="weight")
        rating_task = RecTaskInfo(name="rating", label_name="rating", prediction_name="rating", weight_name="weight")
        # window_size counts rows over all ranks: big enough that "window" means "everything".
        common = dict(world_size=world_size, my_rank=rank, batch_size=1,
                      window_size=max(max_rows, 1) * world_size, compute_on_all_ranks=True)
        self.click = [AUCMetric(**common, tasks=[click]), NEMetric(**common, tasks=[click], include_logloss=True),
                      CalibrationMetric(**common, tasks=[click])]
        self.rating = MSEMetric(**common, tasks=[rating_task]) if rating else None
        for metric in [*self.click, self.rating]:
            if metric is not None:
                metric.to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, predicted_ratings: torch.Tensor | None = None,
               ratings: torch.Tensor | None = None) -> None:
        """(N,) click logits and labels; (N,) predicted and true ratings, scored where labels > 0."""
        ones = torch.ones_like(labels, dtype=torch.float32)
        for metric in self.click:
            metric.update(predictions={"click": torch.sigmoid(logits.float())}, labels={"click": labels.float()},
                          weights={"click": ones})
        if self.rating is not None and predicted_ratings is not None:
            positive = (labels > 0).float()
            self.rating.update(predictions={"rating": predicted_ratings.float()}, labels={"rating": ratings.float()},
                               weights={"rating": positive})

    def compute(self) -> dict[str, float]:
        """{auc, logloss, ne, calibration[, rating_mse]} (collective: every rank must call it)."""
        values: dict[str, float] = {}
        for metric in [*self.click, self.rating]:
            if metric is not None:
                values.update({key: value.item() for key, value in metric.compute().items()})
        result = {
            "auc": values["auc-click|window_auc"],
            # torchrec's log loss is in bits (log2); report the usual natural-log BCE.
            "logloss": values["ne-click|lifetime_logloss"] * math.log(2.0),
            "ne": values["ne-click|lifetime_ne"],
            "calibration": values["calibration-click|lifetime_calibration"],
        }
        if self.rating is not None:
            result["rating_mse"] = values["mse-rating|lifetime_mse"]
        return result


class TrainClickWindow:
    """Training-window ``auc`` and ``ne`` of a task's click logits, through ``torchrec.metrics``.

    The window is the last ``steps`` training steps of every rank (torchrec's ``window_auc`` and
    ``window_ne``): with ``steps = logging.log_every_steps`` each log line scores the steps since
    the previous one. Built on the first :meth:`update`, which fixes the rows of a step.
    """

    def __init__(self, world_size: int, rank: int, steps: int, device: torch.device) -> None:
        self.world_size, self.rank, self.steps, self.device = world_size, rank, steps, device
        self.metrics: list | None = None

    def _build(self, rows_per_step: int) -> list:
        from torchrec.metrics.auc import AUCMetric
        from torchrec.metrics.metrics_config import RecTaskInfo
        from torchrec.metrics.ne import NEMetric

        click = RecTaskInfo(name="click", label_name="label", prediction_name="click", weight_name="weight")
        # window_size counts rows over all ranks; compute_on_all_ranks: the gather is collective anyway.
        common = dict(world_size=self.world_size, my_rank=self.rank, batch_size=rows_per_step, tasks=[click],
                      window_size=rows_per_step * max(self.steps, 1) * self.world_size, compute_on_all_ranks=True)
        return [metric.to(self.device) for metric in (AUCMetric(**common), NEMetric(**common))]

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """(R,) click logits and click labels (1, 0, or -1 for a padding row, which weighs 0)."""
        if self.metrics is None:
            self.metrics = self._build(logits.numel())
        labels = labels.detach().float()
        inputs = dict(predictions={"click": torch.sigmoid(logits.detach().float())},
                      labels={"click": labels.clamp_min(0.0)}, weights={"click": (labels >= 0).float()})
        for metric in self.metrics:
            metric.update(**inputs)

    def compute(self) -> dict[str, float]:
        """{auc, ne} of the window (collective: every rank must call it; empty before any update)."""
        if self.metrics is None:
            return {}
        values = {key: value.item() for metric in self.metrics for key, value in metric.compute().items()}
        return {"auc": values["auc-click|window_auc"], "ne": values["ne-click|window_ne"]}


def format_ranking_table(metrics: dict[str, float], columns: dict[str, str]) -> str:
    """Rows = ranking metrics found in ``metrics``; columns = {title: key prefix ('' = the model)}.

    Example: ``format_ranking_table(m, {"model": "", "popularity": "popularity/"})``.
    """
    names: list[str] = []
    for prefix in columns.values():
        for key in metrics:
            name = key[len(prefix):]
            if key.startswith(prefix) and "@" in name and "/" not in name and name not in names:
                names.append(name)
    header = f"{'metric':<14}" + "".join(f"{title:>14}" for title in columns)
    lines = [header, "-" * len(header)]
    for name in names:
        cells = "".join(
            f"{metrics[prefix + name]:>14.4f}" if isinstance(metrics.get(prefix + name), float) else f"{'-':>14}"
            for prefix in columns.values()
        )
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    """A run's metrics for the terminal: the ranking table if it has top-K metrics, else one
    ``name value`` line per scalar metric (e.g. a ranker's auc, logloss, ne, calibration)."""
    if any("@" in key and "/" not in key for key in metrics):
        return format_ranking_table(metrics, {"model": "", "popularity": "popularity/"})
    lines = [f"{'metric':<14}{'value':>14}", "-" * 28]
    for name, value in metrics.items():
        if "/" not in name and isinstance(value, float) and name not in ("train_seconds",):
            lines.append(f"{name:<14}{value:>14.4f}")
    return "\n".join(lines)
