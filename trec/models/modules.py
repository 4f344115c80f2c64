"""Blocks shared by trec's models: embedding tables from the dataset manifest, the numeric path."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.modules.mlp import MLP

from trec.config import ModelConfig, Pooling
from trec.data import FeatureSpec
from trec.errors import TrecError
from trec.models.managed import managed_rows, refuse_managed


def check_table_overrides(cfg: ModelConfig, features: Sequence[FeatureSpec]) -> None:
    """Reject a `model.tables` entry that names no categorical feature of the dataset."""
    names = [feature.name for feature in features]
    unknown = sorted(set(cfg.tables) - set(names))
    if unknown:
        raise TrecError(
            f"model.tables: unknown feature '{unknown[0]}'; the dataset's categorical features are: {', '.join(names)}"
        )


def embedding_tables(features: Sequence[FeatureSpec], cfg: ModelConfig,
                     managed: bool = False) -> list[EmbeddingBagConfig]:
    """One table per categorical feature, named after it; width and pooling from the config.

    Multi-hot bags (genres, history) are mean-pooled by default so that their scale does not
    grow with the bag's length. ``managed``: the model remaps managed IDs (:mod:`trec.models.managed`),
    whose tables get zch_size rows; otherwise a managed feature is refused.
    """
    if not managed:
        refuse_managed(features, cfg)
    tables = []
    for feature in features:
        override = cfg.tables.get(feature.name)
        dim = override.embedding_dim if override and override.embedding_dim else cfg.embedding_dim
        pooling = override.pooling if override and override.pooling else None
        if pooling is None:
            pooling = Pooling.mean if feature.multi_hot else Pooling.sum
        tables.append(
            EmbeddingBagConfig(
                name=feature.name,
                embedding_dim=dim,
                num_embeddings=managed_rows(feature, cfg) if feature.zch_size else feature.cardinality,
                feature_names=[feature.name],
                pooling=PoolingType.MEAN if pooling == Pooling.mean else PoolingType.SUM,
            )
        )
    return tables


def embedding_bag_collection(tables: list[EmbeddingBagConfig]) -> EmbeddingBagCollection:
    """An EBC on the meta device: DistributedModelParallel materialises only each rank's shards,
    so a table larger than one device is never allocated whole."""
    return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


class NumericArch(nn.Module):
    """Selected numeric columns → one ReLU layer.

    Args:
        columns: indices into the batch's dense features that belong to this arch.
        out_dim: width of the output.
    Shapes: forward((B X F) dense features) → B X out_dim.
    """

    def __init__(self, columns: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(list(columns), dtype=torch.long), persistent=False)
        self.mlp = MLP(len(columns), [out_dim])

    def forward(self, dense_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense_features.index_select(1, self.columns))
