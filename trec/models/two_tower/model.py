"""Two-tower retrieval: a user tower and an item tower over sharded embedding tables.

Each tower is an EmbeddingBagCollection over its side's categorical features (IDs, side
features, multi-hot bags such as genres or the user's history), a small numeric path, and an
MLP (torchrec's ``MLP``) ending in a linear layer of width D. The score of a (user, item) pair
is the dot product of the two ``B X D`` embeddings (a cosine when both are L2-normalised),
divided by a temperature. Nothing here knows about FAISS: exporting the item tower's output
is trec.export's job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor, KeyedTensor
from torchrec.modules.mlp import MLP

from data_pipeline.layout import ITEM_ID
from trec.config import ModelConfig
from trec.data import PreparedDataset, RecBatch
from trec.data.managed import catalog_index
from trec.losses import candidate_log_q, pointwise_bce_loss, sampled_softmax_loss
from trec.models.managed import build_managed_ids
from trec.models.modules import NumericArch, check_table_overrides, embedding_bag_collection, embedding_tables
from trec.models.two_tower.config import NegativeStrategy, RetrievalLoss, RetrievalLossConfig, TwoTowerConfig
from trec.negatives import ExtraItemSampler, popularity_distribution

# Entities whose features feed each tower; context (per-interaction) features describe the query.
USER_SIDE = ("user", "context")
ITEM_SIDE = ("item",)


class Tower(nn.Module):
    """Embeddings of one side's features (+ numeric path) → MLP → R X D.

    Args:
        tables: the side's embedding tables (one per categorical feature).
        numeric_columns: indices of the side's numeric features in ``RecBatch.dense_features``.
        cfg: widths, dropout and normalisation.
    """

    def __init__(self, tables, numeric_columns: list[int], cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.ebc = embedding_bag_collection(tables)
        self.feature_names = [name for table in tables for name in table.feature_names]
        self.numeric = NumericArch(numeric_columns, cfg.dense_dim) if numeric_columns else None
        in_dim = sum(table.embedding_dim for table in tables) + (cfg.dense_dim if numeric_columns else 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.mlp = MLP(in_dim, list(cfg.tower_layers)) if cfg.tower_layers else nn.Identity()
        self.out = nn.Linear(cfg.tower_layers[-1] if cfg.tower_layers else in_dim, cfg.output_dim)

    def forward(self, features: KeyedJaggedTensor, dense_features: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """features: KJT with stride R (other keys are ignored); dense_features: R X F.

        Returns the first ``rows`` (default all R) un-normalised embeddings, ``rows X D``; the
        tail rows are skipped before the MLP (item-only rows carry no user features).
        """
        # By name, never .values(): a sharded EBC orders its output keys by the sharding plan,
        # which changes with the world size.
        pooled = KeyedTensor.regroup([self.ebc(features)], [self.feature_names])[0][:rows]
        parts = [pooled]
        if self.numeric is not None:
            parts.append(self.numeric(dense_features[:rows]))
        hidden = self.mlp(self.dropout(torch.cat(parts, dim=1)))
        return self.out(hidden)


class TwoTower(nn.Module):
    """User and item towers; ``score = <user, item> / T`` (cosine / T when normalised).

    The :class:`~trec.models.spec.Retriever` of a two-tower run (``encode_users``, ``encode_items``).
    """

    def __init__(self, model: ModelConfig, cfg: TwoTowerConfig, dataset: PreparedDataset) -> None:
        super().__init__()
        check_table_overrides(model, dataset.sparse_features)
        self.user_tower = self._tower(model, cfg, dataset, USER_SIDE)
        self.item_tower = self._tower(model, cfg, dataset, ITEM_SIDE)
        # Managed user_id/item_id: raw-ID hashes → table rows, replicated in front of the sharded tables.
        self.managed_ids = build_managed_ids(dataset.sparse_features, model)
        self.normalized = cfg.normalize

    @staticmethod
    def _tower(model: ModelConfig, cfg: TwoTowerConfig, dataset: PreparedDataset, entities: tuple[str, ...]) -> Tower:
        sparse = [f for f in dataset.sparse_features if f.entity in entities]
        numeric = [i for i, f in enumerate(dataset.dense_features) if f.entity in entities]
        return Tower(embedding_tables(sparse, model, managed=True), numeric, cfg)

    def remap(self, features: KeyedJaggedTensor, claim_rows: int | None = None) -> KeyedJaggedTensor:
        """Managed IDs → table rows (:mod:`trec.models.managed`; in training the IDs of the first
        ``claim_rows`` rows claim rows); other datasets' KJTs unchanged."""
        return features if self.managed_ids is None else self.managed_ids(features, claim_rows)

    def finish(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.normalize(embedding, dim=-1) if self.normalized else embedding

    def encode_users(self, batch: RecBatch, rows: int | None = None) -> torch.Tensor:
        """``rows X D`` embeddings of the batch's users (all rows by default)."""
        return self.finish(self.user_tower(self.remap(batch.sparse_features), batch.dense_features, rows))

    def encode_items(self, batch: RecBatch) -> torch.Tensor:
        """``R X D`` embeddings of every row's item (positives, then extra candidates)."""
        return self.finish(self.item_tower(self.remap(batch.sparse_features), batch.dense_features))


class RetrievalTask(nn.Module):
    """The two-tower model plus its loss: ``forward(batch) -> (loss, outputs)``.

    A batch holds B labelled (user, item) rows followed by N item-only rows drawn by the
    :class:`~trec.negatives.ExtraItemSampler` (``augment``). A labelled row is a positive when
    its label is >= data.positive_threshold; the others weigh 0 in the loss and are no
    candidates (see :mod:`trec.losses`). Candidates for every row are the batch's positives
    (in-batch negatives) and the N extras. With ``loss.label_weighting`` a positive row weighs
    its (graded) label, else 1.
    """

    def __init__(self, model: ModelConfig, cfg: TwoTowerConfig, dataset: PreparedDataset) -> None:
        super().__init__()
        self.model = TwoTower(model, cfg, dataset)
        self.loss_cfg = cfg.loss
        self.positive_threshold = dataset.positive_threshold
        self.catalog_index = catalog_index(dataset, ITEM_ID)  # None unless item_id is managed
        self.augment = ExtraItemSampler(dataset.item_counts, extra_candidates(cfg.loss), popular_share(cfg.loss))
        self.register_buffer(
            "item_probability", torch.tensor(popularity_distribution(dataset.item_counts), dtype=torch.float32)
        )
        self.register_buffer(
            "extra_probability", torch.tensor(self.augment.probability, dtype=torch.float32)
        )
        log_inverse_temperature = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.log_inverse_temperature = nn.Parameter(log_inverse_temperature)
        else:
            self.register_buffer("log_inverse_temperature", log_inverse_temperature)

    @property
    def retriever(self) -> TwoTower:
        return self.model

    @property
    def inverse_temperature(self) -> torch.Tensor:
        # Bounded so a learned temperature cannot collapse the softmax (1/T <= 100).
        return self.log_inverse_temperature.clamp(max=math.log(100.0)).exp()

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        num_positives = batch.labels.shape[0]
        # Once per step (it updates the managed-ID state), from the labelled rows only, not the negatives.
        features = self.model.remap(batch.sparse_features, num_positives)
        user = self.model.user_tower(features, batch.dense_features, num_positives)
        candidates = self.model.item_tower(features, batch.dense_features)
        candidate_items = batch.sparse_features["item_id"].values()
        if self.catalog_index is not None:  # managed IDs: popularity and hit masking are keyed by catalog item
            candidate_items = self.catalog_index(candidate_items)
        loss = self.loss(self.model.finish(user), self.model.finish(candidates), candidate_items, num_positives,
                         self.row_weights(batch.labels))
        outputs = {
            "loss": loss.detach(),
            # Norms before normalisation: how far the towers drift, logged as histograms.
            "user_norm": user.detach().norm(dim=1),
            "item_norm": candidates.detach().norm(dim=1),
        }
        return loss, outputs

    def row_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) loss weight of each labelled row: 0 below the positive threshold, else 1 (or the
        label with ``label_weighting``). No branch on the data: the forward is fx-traced."""
        positive = (labels >= self.positive_threshold).to(labels.dtype)
        return positive * labels if self.loss_cfg.label_weighting else positive

    def loss(self, user, candidates, candidate_items, num_positives: int, row_weights: torch.Tensor) -> torch.Tensor:
        cfg = self.loss_cfg
        if cfg.kind == RetrievalLoss.bce:
            return pointwise_bce_loss(
                user, candidates, candidate_items, self.inverse_temperature, cfg.mask_accidental_hits, row_weights
            )
        log_q = None
        if cfg.logq_correction:
            # Without extras their term is 0 * p: skipping it saves a gather over the catalog each step.
            extra = self.extra_probability if self.augment.num_extra else None
            log_q = candidate_log_q(candidate_items, self.item_probability, extra, num_positives,
                                    (row_weights > 0).sum())
        num_hard = None
        if cfg.negatives == NegativeStrategy.hard and cfg.num_negatives > 0:
            num_hard = max(1, min(cfg.num_hard_negatives, cfg.num_negatives))
        return sampled_softmax_loss(
            user, candidates, candidate_items, self.inverse_temperature, log_q, cfg.mask_accidental_hits, num_hard,
            row_weights,
        )


def extra_candidates(cfg: RetrievalLossConfig) -> int:
    """Extra candidate items drawn per batch (none with ``negatives: none``)."""
    return 0 if cfg.negatives == NegativeStrategy.none else cfg.num_negatives


def popular_share(cfg: RetrievalLossConfig) -> float:
    """Share of the extra candidates drawn by popularity (the rest are uniform)."""
    return {NegativeStrategy.popular: 1.0, NegativeStrategy.mixed: cfg.mix_popular}.get(cfg.negatives, 0.0)
