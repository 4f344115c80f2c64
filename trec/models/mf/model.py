"""Matrix factorization: one embedding per user ID and per item ID; score = their dot product.

The two tables live in one torchrec ``EmbeddingCollection`` (unpooled: one vector per ID),
sharded like any other table. There is no MLP, no side feature and no normalisation: a user's
vector and an item's vector are the model. Trained with BPR (Rendle et al., 2009) against the
items the :class:`~trec.negatives.ExtraItemSampler` draws for each batch, or with the in-batch
sampled softmax of :mod:`trec.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor

from data_pipeline.layout import ITEM_ID, USER_ID
from trec.config import ModelConfig
from trec.data import PreparedDataset, RecBatch
from trec.errors import TrecError
from trec.losses import accidental_hits, candidate_log_q, sampled_softmax_loss
from trec.models.mf.config import MFConfig, MFLoss
from trec.models.managed import refuse_managed
from trec.models.modules import check_table_overrides
from trec.negatives import ExtraItemSampler, popularity_distribution


def id_tables(model: ModelConfig, dataset: PreparedDataset) -> list[EmbeddingConfig]:
    """One unpooled table per ID feature (user_id, item_id), named after it; width from the config.

    Both widths must be equal: the score is the dot product of the two vectors.
    """
    check_table_overrides(model, dataset.sparse_features)
    refuse_managed(dataset.sparse_features, model)
    features = {feature.name: feature for feature in dataset.sparse_features}
    tables = []
    for name in (USER_ID, ITEM_ID):
        override = model.tables.get(name)
        dim = override.embedding_dim if override and override.embedding_dim else model.embedding_dim
        tables.append(EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=features[name].cardinality,
                                      feature_names=[name]))
    if tables[0].embedding_dim != tables[1].embedding_dim:
        raise TrecError(f"model.tables: mf needs user_id and item_id of one width (their dot product is the score), "
                        f"got {tables[0].embedding_dim} and {tables[1].embedding_dim}")
    return tables


def rows_of(embeddings: JaggedTensor) -> torch.Tensor:
    """R X D: each row's vector (the sum of its IDs' vectors: its one ID's, zeros for an empty row).

    An unpooled lookup returns one vector per ID, V <= R of them (item-only rows have no user
    ID, padding rows none at all); they are scattered back by the lengths, with no branch on
    the data: TrainPipelineSparseDist fx-traces the forward.
    """
    values, lengths = embeddings.values(), embeddings.lengths()
    rows = torch.arange(lengths.shape[0], device=lengths.device)
    owner = torch.repeat_interleave(rows, lengths.long())
    return values.new_zeros((lengths.shape[0], values.shape[1])).index_add(0, owner, values)


class MatrixFactorization(nn.Module):
    """User and item ID embeddings; ``score = <user, item>``.

    The :class:`~trec.models.spec.Retriever` of an mf run (``encode_users``, ``encode_items``);
    not normalised, so the index ranks by inner product.
    """

    normalized = False

    def __init__(self, model: ModelConfig, dataset: PreparedDataset) -> None:
        super().__init__()
        # Meta device: DistributedModelParallel materialises only each rank's shards.
        self.embeddings = EmbeddingCollection(tables=id_tables(model, dataset), device=torch.device("meta"))

    def lookup(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R X D users, R X D items) of a KJT with stride R (other keys are ignored)."""
        # By name: a sharded collection's output order follows the sharding plan.
        looked_up = self.embeddings(features)
        return rows_of(looked_up[USER_ID]), rows_of(looked_up[ITEM_ID])

    def encode_users(self, batch: RecBatch, rows: int | None = None) -> torch.Tensor:
        """``rows X D`` embeddings of the batch's first ``rows`` users (default all R rows)."""
        return self.lookup(batch.sparse_features)[0][:rows]

    def encode_items(self, batch: RecBatch) -> torch.Tensor:
        """``R X D`` embeddings of every row's item."""
        return self.lookup(batch.sparse_features)[1]


def bpr_loss(user: torch.Tensor, items: torch.Tensor, candidate_items: torch.Tensor, row_weights: torch.Tensor,
             mask_hits: bool = True) -> torch.Tensor:
    """BPR: ``-log sigmoid(<u_i, v_i> - <u_i, v_j>)`` of each positive row i against each sampled item j.

    Args:
        user: B X D, the labelled rows' users.
        items: (B + N) X D, the labelled rows' items then the N sampled items.
        candidate_items: (B + N,) item indices (to mask a sampled item that is the row's positive).
        row_weights: (B,) 0 for a row that is not a positive.
    Returns:
        scalar: each row's mean over its (unmasked) negatives, then ``sum(w * row) / sum(w)``.
    """
    num_positives = user.shape[0]
    positive = (user * items[:num_positives]).sum(dim=1, keepdim=True)  # B X 1
    negative = user @ items[num_positives:].T  # B X N
    per_pair = -F.logsigmoid(positive - negative)
    keep = torch.ones_like(per_pair, dtype=torch.bool)
    if mask_hits:
        keep = ~accidental_hits(candidate_items, num_positives)[:, num_positives:]
    per_row = (per_pair * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    return (per_row * row_weights).sum() / row_weights.sum().clamp_min(1e-12)


def l2_penalty(user: torch.Tensor, items: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``mean_w(|u_i|² + |v_i|²) + mean_j |v_j|²`` over the B labelled rows and the N sampled items."""
    num_positives = user.shape[0]
    looked_up = user.square().sum(dim=1) + items[:num_positives].square().sum(dim=1)
    labelled = (looked_up * row_weights).sum() / row_weights.sum().clamp_min(1e-12)
    return labelled + items[num_positives:].square().sum(dim=1).mean()


class MFTask(nn.Module):
    """Matrix factorization plus its loss: ``forward(batch) -> (loss, outputs)``.

    A batch holds B labelled (user, item) rows followed by N item-only rows drawn by the
    :class:`~trec.negatives.ExtraItemSampler` (``augment``). A labelled row is a positive when
    its label is >= data.positive_threshold; the others weigh 0. BPR compares each positive
    with the N sampled items; the softmax with the batch's other positives and the N items.
    """

    def __init__(self, model: ModelConfig, cfg: MFConfig, dataset: PreparedDataset) -> None:
        super().__init__()
        self.model = MatrixFactorization(model, dataset)
        self.cfg = cfg
        self.positive_threshold = dataset.positive_threshold
        self.augment = ExtraItemSampler(dataset.item_counts, cfg.num_negatives, cfg.popular_share)
        self.register_buffer(
            "item_probability", torch.tensor(popularity_distribution(dataset.item_counts), dtype=torch.float32)
        )
        self.register_buffer("extra_probability", torch.tensor(self.augment.probability, dtype=torch.float32))

    @property
    def retriever(self) -> MatrixFactorization:
        return self.model

    def forward(self, batch: RecBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        num_positives = batch.labels.shape[0]
        users, items = self.model.lookup(batch.sparse_features)
        user = users[:num_positives]
        candidate_items = batch.sparse_features[ITEM_ID].values()
        weights = self.row_weights(batch.labels)
        loss = self.ranking_loss(user, items, candidate_items, num_positives, weights)
        if self.cfg.l2 > 0:
            loss = loss + self.cfg.l2 * l2_penalty(user, items, weights)
        # Norms logged as histograms: how far the embeddings grow (what l2 holds back).
        outputs = {"loss": loss.detach(), "user_norm": user.detach().norm(dim=1),
                   "item_norm": items.detach().norm(dim=1)}
        return loss, outputs

    def row_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) 1 for a positive row (label >= the threshold), else 0."""
        return (labels >= self.positive_threshold).to(labels.dtype)

    def ranking_loss(self, user, items, candidate_items, num_positives: int, row_weights) -> torch.Tensor:
        cfg = self.cfg
        if cfg.loss == MFLoss.bpr:
            return bpr_loss(user, items, candidate_items, row_weights, cfg.mask_accidental_hits)
        log_q = None
        if cfg.logq_correction:
            log_q = candidate_log_q(candidate_items, self.item_probability, self.extra_probability, num_positives,
                                    (row_weights > 0).sum())
        return sampled_softmax_loss(user, items, candidate_items, 1.0 / cfg.temperature, log_q,
                                    cfg.mask_accidental_hits, row_weights=row_weights)
