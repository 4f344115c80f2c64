"""DCN-v2 ranking: a click (and optional rating) model over sharded embedding tables.

One embedding table per categorical feature of the user, the item and the context (the user's
history as a mean-pooled multi-hot bag included), in one ``EmbeddingBagCollection`` that DMP
shards; the numeric features go through a bottom MLP (torchrec's ``DenseArch``). The
interaction arch is picked by ``model.dcn.interaction``:

- ``dcn``: DCN-v2's low-rank cross network (torchrec's ``LowRankCrossNet``) over the
  concatenation x0 of every embedding and the dense vector, then the top MLP (``stacked``), or
  the cross network beside a deep MLP over the same x0, concatenated (``parallel``);
- ``dot``: DLRM's pairwise dot products (torchrec's ``InteractionArch``), which need one common
  embedding width;
- ``none``: x0 itself (a plain MLP ranker).

The top MLP ends in a click logit and, when ``rating_weight > 0``, a rating prediction. With
``wide_cross`` a wide part adds a full-rank item-to-item score of the candidate against the
user's history (:class:`WideCross`, another sharded table) to the click logit. The
task (:class:`RankingTask`) samples negatives per positive (:class:`~trec.negatives.RankingNegativeSampler`,
uniform and, from a trained two-tower, hard) and trains ``L = BCE(click) + α·MSE(rating | positives)``,
where click = 1 for a positive row (label >= data.positive_threshold) and 0 for a labelled
non-positive row or a sampled negative; with ``loss: pairwise`` the BCE becomes a RankNet/BPR
loss over each user's (positive, negative) row pairs (:func:`pairwise_click_loss`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.models.dlrm import DenseArch, InteractionArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP

from data_pipeline import layout as L
from trec.config import ModelConfig
from trec.data import FeatureSpec, PreparedDataset, RecBatch, parquet_errors
from trec.errors import TrecError
from trec.evaluation.candidates import load_or_mine_hard_candidates
from trec.evaluation.ranking import evaluate_ranking
from trec.models.dcn.config import CrossStructure, DCNConfig, Interaction, RankingLoss
from trec.models.modules import check_table_overrides, embedding_bag_collection, embedding_tables
from trec.models.spec import EvaluationRequest, SetupContext
from trec.negatives import RankingNegativeSampler

HARD_NEGATIVES_FILE = "hard_negatives.parquet"


# --------------------------------------------------------------------------------------------
# arches
# --------------------------------------------------------------------------------------------


class SparseArch(nn.Module):
    """Every categorical feature's pooled embedding, concatenated in a fixed order: KJT → R X ΣD.

    Unlike torchrec's ``SparseArch`` the widths may differ (only ``dot`` needs them equal).
    """

    def __init__(self, tables) -> None:
        super().__init__()
        self.ebc = embedding_bag_collection(tables)
        self.feature_names = [name for table in tables for name in table.feature_names]
        self.widths = [table.embedding_dim for table in tables for _ in table.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        # By name, never .values(): a sharded EBC orders its output keys by the sharding plan.
        return KeyedTensor.regroup([self.ebc(features)], [self.feature_names])[0]


class CrossInteraction(nn.Module):
    """Stacked DCN-v2: ``cross(x0)`` with x0 = [dense, embeddings]; B X N → B X N."""

    def __init__(self, in_features: int, cfg: DCNConfig) -> None:
        super().__init__()
        self.crossnet = LowRankCrossNet(in_features, cfg.cross_layers, cfg.low_rank)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_features = in_features

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.crossnet(self.dropout(torch.cat([dense, sparse], dim=1)))


class ParallelCrossInteraction(nn.Module):
    """Parallel DCN-v2: ``[cross(x0), deep(x0)]``; B X N → B X (N + top_layers[-1])."""

    def __init__(self, in_features: int, cfg: DCNConfig) -> None:
        super().__init__()
        self.crossnet = LowRankCrossNet(in_features, cfg.cross_layers, cfg.low_rank)
        self.deep = MLP(in_features, list(cfg.top_layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_features = in_features + cfg.top_layers[-1]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x0 = self.dropout(torch.cat([dense, sparse], dim=1))
        return torch.cat([self.crossnet(x0), self.deep(x0)], dim=1)


class DotInteraction(nn.Module):
    """DLRM: the dense vector and the pairwise dots of [dense, F embeddings]; B X (D + C(F+1, 2)).

    torchrec's ``InteractionArch`` over the embeddings reshaped to B X F X D.
    """

    def __init__(self, num_features: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.interaction = InteractionArch(num_features)
        self.num_features, self.dim = num_features, dim
        self.dropout = nn.Dropout(dropout)
        self.out_features = dim + num_features * (num_features + 1) // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        sparse = self.dropout(sparse).reshape(-1, self.num_features, self.dim)
        return self.interaction(dense, sparse)


class ConcatInteraction(nn.Module):
    """No explicit interaction: x0 = [dense, embeddings] for the top MLP; B X N."""

    def __init__(self, in_features: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_features = in_features

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.cat([dense, sparse], dim=1))


class WideCross(nn.Module):
    """Wide full-rank history X item cross: ``mean_{j in history} W[item, column(j)]``; KJT → (R,).

    W is an embedding table (sharded like the others) whose row for candidate item i holds one
    weight per history item j: an item-to-item model at full rank (what EASE/SLIM learn), which
    low-rank embeddings pooled over the history cannot express. Looking up the candidate's row and
    reading it at the history's columns costs R X columns, not R X history X columns. The table
    starts at zero, so it only adds what the deep part misses.
    """

    def __init__(self, history: FeatureSpec, item: FeatureSpec, buckets: int) -> None:
        super().__init__()
        self.columns = buckets or history.cardinality
        # FBGEMM's kernels want widths in multiples of 4; the padding columns are never read.
        width = -(-self.columns // 4) * 4
        table = EmbeddingBagConfig(name=f"{item.name}_wide", embedding_dim=width, num_embeddings=item.cardinality,
                                   feature_names=[item.name], weight_init_min=0.0, weight_init_max=0.0)
        self.ebc = embedding_bag_collection([table])
        self.history, self.item = history.name, item.name

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        rows = self.ebc(features)[self.item]  # R X width: each row's candidate item's weights
        history = features[self.history]
        lengths = history.lengths().long()
        owner = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lengths)
        weights = rows[owner, history.values() % self.columns]
        total = torch.zeros(rows.shape[0], device=rows.device, dtype=rows.dtype).index_add(0, owner, weights)
        return total / lengths.clamp_min(1).to(rows.dtype)


class Heads(nn.Module):
    """Top hidden B X H → click logit (B,) (plus the wide cross's (B,) if given) and, if enabled,
    the predicted rating (B,) (else None).

    The rating is predicted around ``rating_center`` (the mean training rating), so the head
    starts unbiased instead of climbing from 0 to ~3.5 over thousands of Adam steps.
    """

    def __init__(self, in_features: int, rating_center: float | None) -> None:
        super().__init__()
        self.click = nn.Linear(in_features, 1)
        self.rating = nn.Linear(in_features, 1) if rating_center is not None else None
        self.register_buffer("rating_center", torch.tensor(rating_center or 0.0), persistent=False)

    def forward(self, hidden: torch.Tensor, wide: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        rating = self.rating(hidden).squeeze(1) + self.rating_center if self.rating is not None else None
        click = self.click(hidden).squeeze(1)
        return (click + wide if wide is not None else click), rating


def _interaction(cfg: DCNConfig, widths: list[int], dense_width: int) -> nn.Module:
    in_features = dense_width + sum(widths)
    if cfg.interaction == Interaction.dcn:
        if cfg.cross_layers < 1 or cfg.low_rank < 1:
            raise TrecError(f"model.dcn: cross_layers ({cfg.cross_layers}) and low_rank ({cfg.low_rank}) must be >= 1")
        if cfg.structure == CrossStructure.parallel:
            if not cfg.top_layers:
                raise TrecError("model.dcn.top_layers: structure parallel needs the deep MLP's widths (non-empty)")
            return ParallelCrossInteraction(in_features, cfg)
        return CrossInteraction(in_features, cfg)
    if cfg.interaction == Interaction.dot:
        if len(set(widths)) != 1 or dense_width != widths[0]:
            raise TrecError(
                f"model.dcn.interaction: dot needs every embedding and the bottom MLP's output to have one width; "
                f"got embedding widths {sorted(set(widths))} and model.dcn.dense_layers[-1]={dense_width} "
                "(align model.embedding_dim, model.tables.*.embedding_dim and model.dcn.dense_layers)"
            )
        return DotInteraction(len(widths), widths[0], cfg.dropout)
    return ConcatInteraction(in_features, cfg.dropout)


class DCNRanker(nn.Module):
    """DCN-v2 / DLRM / MLP ranker: ``forward(batch) -> (click logits (R,), ratings (R,) or None)``.

    Arches: ``sparse_arch`` (sharded tables, R X ΣD), ``dense_arch`` (numeric features → R X Dd),
    ``inter_arch`` (cross network, dots or concatenation), ``over_arch`` (top MLP → R X H) and
    ``heads``.
    """

    def __init__(self, model: ModelConfig, dcn: DCNConfig, dataset: PreparedDataset,
                 rating_center: float | None = None) -> None:
        super().__init__()
        check_table_overrides(model, dataset.sparse_features)
        if not dcn.dense_layers:
            raise TrecError("model.dcn.dense_layers: the bottom MLP needs at least one layer")
        tables = embedding_tables(dataset.sparse_features, model)
        self.sparse_arch = SparseArch(tables)
        # With no numeric feature the bottom MLP sees 0 columns and reduces to a learned constant.
        self.dense_arch = DenseArch(len(dataset.dense_features), list(dcn.dense_layers))
        self.inter_arch = _interaction(dcn, self.sparse_arch.widths, dcn.dense_layers[-1])
        stacked_top = bool(dcn.top_layers) and not isinstance(self.inter_arch, ParallelCrossInteraction)
        self.over_arch = MLP(self.inter_arch.out_features, list(dcn.top_layers)) if stacked_top else nn.Identity()
        self.wide_arch = _wide_cross(dcn, dataset)
        self.heads = Heads(dcn.top_layers[-1] if stacked_top else self.inter_arch.out_features, rating_center)

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        dense = self.dense_arch(batch.dense_features)
        sparse = self.sparse_arch(batch.sparse_features)
        hidden = self.over_arch(self.inter_arch(dense, sparse))
        wide = self.wide_arch(batch.sparse_features) if self.wide_arch is not None else None
        return self.heads(hidden, wide)


def _wide_cross(cfg: DCNConfig, dataset: PreparedDataset) -> WideCross | None:
    if not cfg.wide_cross:
        return None
    history = [f for f in dataset.sparse_features if f.name == L.USER_HISTORY]
    item = [f for f in dataset.sparse_features if f.name == L.ITEM_ID]
    if not history or not item:
        raise TrecError(f"model.dcn.wide_cross: {dataset.path} has no {L.USER_HISTORY} feature "
                        "(prepare it with history_max_len > 0) or no item_id")
    if cfg.wide_cross_buckets < 0:
        raise TrecError(f"model.dcn.wide_cross_buckets: expected >= 0, got {cfg.wide_cross_buckets}")
    return WideCross(history[0], item[0], cfg.wide_cross_buckets)


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


class RankingTask(nn.Module):
    """The ranker plus its loss: ``forward(batch) -> (loss, outputs)``.

    A training batch holds B labelled rows followed by B * k sampled rows (``augment``), all
    full (user, item) rows whose labels the sampler turned into click targets: 1 (positive), 0
    (a labelled non-positive row or a sampled negative), or -1 (the sampled rows of a
    non-positive row: padding, weight 0). ``L = BCE(click) + α · MSE(rating)``, the BCE a mean
    over the rows of weight 1 (or, with ``loss: pairwise``, :func:`pairwise_click_loss`), the MSE
    over the positive rows only (negatives have no rating).
    """

    def __init__(self, model: ModelConfig, dcn: DCNConfig, dataset: PreparedDataset) -> None:
        super().__init__()
        self.cfg = dcn
        if dcn.rating_weight > 0 and not dataset.has_rating:
            raise TrecError(f"model.dcn.rating_weight: {dataset.path} has no ratings; set it to 0")
        if not 0.0 <= dcn.hard_negative_ratio <= 1.0:
            raise TrecError(f"model.dcn.hard_negative_ratio: expected a share in [0, 1], got {dcn.hard_negative_ratio}")
        if dcn.hard_negative_ratio > 0 and not dcn.hard_negatives_run:
            raise TrecError("model.dcn.hard_negative_ratio > 0 needs model.dcn.hard_negatives_run (a two-tower run directory)")
        self.rating_weight = dcn.rating_weight
        self.model = DCNRanker(model, dcn, dataset, mean_train_rating(dataset) if dcn.rating_weight > 0 else None)
        self.augment = RankingNegativeSampler(
            dataset.user_items(["train"]), dataset.num_items, dcn.negatives_per_positive, dcn.hard_negative_ratio,
            dataset.positive_threshold, dcn.popular_negative_ratio, dataset.item_counts,
        )

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, ratings = self.model(batch)
        if self.cfg.loss == RankingLoss.pairwise:  # a config branch, not a data one
            users = batch.sparse_features[L.USER_ID].values()  # every ranker row has exactly one user
            loss, pairs = pairwise_click_loss(logits, batch.labels, users)
            outputs = {"pairwise_loss": loss.detach(), "pairs": pairs}
        else:
            # No branch on the data (the pipeline traces this forward): padding rows (-1) weigh 0.
            counted = (batch.labels >= 0).to(logits.dtype)
            per_row = F.binary_cross_entropy_with_logits(logits, batch.labels.clamp_min(0.0), reduction="none")
            click_loss = (per_row * counted).sum() / counted.sum().clamp_min(1.0)
            loss, outputs = click_loss, {"click_loss": click_loss.detach()}
        if ratings is not None:
            # No branch on the data (the pipeline traces this forward): weight by "is positive".
            positive = (batch.labels > 0).float()
            rating_loss = (positive * (ratings - batch.ratings) ** 2).sum() / positive.sum().clamp_min(1.0)
            loss = loss + self.rating_weight * rating_loss
            outputs["rating_loss"] = rating_loss.detach()
        outputs["loss"] = loss.detach()
        # Per-row click logits and targets: the logger's training-window auc and ne (torchrec.metrics).
        outputs["logits"], outputs["labels"] = logits.detach(), batch.labels
        return loss, outputs


def pairwise_click_loss(logits: torch.Tensor, clicks: torch.Tensor,
                        users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RankNet/BPR over the batch: mean softplus(s_n - s_p) over every pair of a positive row p
    (click 1) and a negative row n (click 0) of one user; padding rows (-1) and users without
    both kinds add nothing. logits, clicks, users: (R,). Returns (loss, number of pairs), 0-d.

    All pairs, no cap: a user holds few rows of a shuffled batch (k negatives per positive, so
    about k X m^2 pairs for m positives), and pairs are built from each user's run of negatives
    after a sort (O(R log R + pairs) memory, never an R X R mask).
    """
    negative = clicks == 0
    neg_users, order = torch.sort(users[negative], stable=True)
    neg_logits = logits[negative][order]
    positive = clicks > 0
    pos_users, pos_logits = users[positive], logits[positive]
    # Each positive's user's negatives are neg_logits[start:end]; one pair per (positive, negative).
    start = torch.searchsorted(neg_users, pos_users)
    counts = torch.searchsorted(neg_users, pos_users, right=True) - start
    owner = torch.repeat_interleave(torch.arange(pos_users.shape[0], device=logits.device), counts)
    first_pair = torch.cumsum(counts, 0) - counts
    within = torch.arange(owner.shape[0], device=logits.device) - first_pair[owner]
    margins = neg_logits[start[owner] + within] - pos_logits[owner]
    pairs = torch.ones_like(margins).sum()  # not len(): the pipeline fx-traces this forward
    return F.softplus(margins).sum() / pairs.clamp_min(1.0), pairs


def mean_train_rating(dataset: PreparedDataset) -> float:
    """Mean rating of the training split's positive rows, the rows the rating head learns (read one
    file at a time)."""
    import pyarrow.parquet as pq

    total, count = 0.0, 0
    for path in dataset.split_files("train"):
        with parquet_errors(path):
            table = pq.read_table(path, columns=[L.RATING, L.LABEL])
        positive = table[L.LABEL].to_numpy() >= dataset.positive_threshold
        total += float(np.nansum(table[L.RATING].to_numpy()[positive], dtype=np.float64))
        count += int(positive.sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------
# set-up (hard negatives) and evaluation
# --------------------------------------------------------------------------------------------


def setup_dcn(task: RankingTask, context: SetupContext) -> None:
    """Give the sampler its hard candidates: from RUN/hard_negatives.parquet, or mined now.

    Collective: every rank calls it, after sharding and before the first batch is read.
    """
    dcn = task.cfg
    if not dcn.hard_negatives_run or dcn.hard_negative_ratio <= 0:
        return
    candidates = load_or_mine_hard_candidates(
        Path(context.run_dir) / HARD_NEGATIVES_FILE, Path(dcn.hard_negatives_run), dcn.hard_negatives_top_n,
        dcn.hard_negatives_skip_top, context.dataset, context.ctx, context.load_retriever,
    )
    task.augment.set_hard_candidates(candidates)


def evaluate_dcn(task: RankingTask, dataset: PreparedDataset, request: EvaluationRequest, ctx) -> dict[str, float]:
    """Click metrics of the ranker on the split (see :func:`trec.evaluation.ranking.evaluate_ranking`),
    with ``hard_auc`` when the task has hard candidates (training with hard negatives)."""
    dcn = task.cfg
    return evaluate_ranking(task.model, task.model.heads.rating is not None, dataset, request.split, request.data, ctx,
                            dcn.eval_negatives, dcn.eval_seed, task.augment.hard_candidates)


def ranker_scorer(task: RankingTask, dataset: PreparedDataset, history_max_len: int, device: torch.device):
    """(users (M,), items (M,)) → (M,) click logits of the ranker (collective: sharded lookups)."""

    @torch.no_grad()
    def score(users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        batch = dataset.build_batch(users, items, np.zeros(len(users), np.float32), history_max_len=history_max_len)
        return task.model(batch.to(device))[0]

    return score
