"""DCN-v2 ranker pieces: the cross layer by hand, the interaction variants, negatives, click metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trec.config import ModelConfig, TableConfig
from trec.models.dcn.config import CrossStructure, DCNConfig, Interaction
from trec.data import Csr, FeatureSpec
from trec.errors import TrecError
from trec.metrics import ClickMetrics, format_metrics
from trec.evaluation.ranking import held_out_rows
from trec.models.dcn.model import CrossInteraction, DCNRanker
from trec.negatives import RankingNegativeSampler


def test_cross_layers_match_a_hand_computation():
    # x0 = [dense 1, embedding 2]; one rank-1 kernel pair shared by both layers:
    #   x_{l+1} = x0 * (W (V x_l) + b) + x_l, with V = [1 1], W = [1 2]^T, b = [0.5 -1]
    cross = CrossInteraction(2, DCNConfig(cross_layers=2, low_rank=1))
    with torch.no_grad():
        for layer in range(2):
            cross.crossnet.V_kernels[layer].copy_(torch.tensor([[1.0, 1.0]]))
            cross.crossnet.W_kernels[layer].copy_(torch.tensor([[1.0], [2.0]]))
            cross.crossnet.bias[layer].copy_(torch.tensor([0.5, -1.0]))
    out = cross(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    # layer 1: V x0 = 3 → W·3 + b = [3.5, 5] → x0 * . = [3.5, 10] → + x0 = [4.5, 12]
    # layer 2: V x1 = 16.5 → W·16.5 + b = [17, 32] → x0 * . = [17, 64] → + x1 = [21.5, 76]
    assert out.tolist() == [[21.5, 76.0]]


class _Features:
    """The two attributes of PreparedDataset that the ranker's constructor reads."""

    def __init__(self, dims_by_feature: dict[str, int] | None = None) -> None:
        self.sparse_features = [
            FeatureSpec("user_id", "user", "categorical", cardinality=10),
            FeatureSpec("user_history", "user", "categorical", multi_hot=True, cardinality=20),
            FeatureSpec("item_id", "item", "categorical", cardinality=20),
        ]
        self.dense_features = [FeatureSpec("item_year", "item", "numeric")]
        self.path = "fake"
        self.has_rating = True


def _ranker(interaction: Interaction, structure=CrossStructure.stacked, **model) -> DCNRanker:
    dcn = DCNConfig(interaction=interaction, structure=structure, dense_layers=[8, 4], top_layers=[16, 8],
                    cross_layers=2, low_rank=3)
    return DCNRanker(ModelConfig(name="dcn", embedding_dim=4, **model), dcn, _Features(), rating_center=3.5)


@pytest.mark.parametrize(
    "interaction, structure, width",
    [
        (Interaction.dcn, CrossStructure.stacked, 4 + 3 * 4),  # cross keeps x0's width
        (Interaction.dcn, CrossStructure.parallel, 4 + 3 * 4 + 8),  # [cross(x0), deep(x0)]
        (Interaction.dot, CrossStructure.stacked, 4 + 4 * 3 // 2),  # dense + C(F+1, 2) dots
        (Interaction.none, CrossStructure.stacked, 4 + 3 * 4),
    ],
)
def test_interaction_variants_share_the_arches(interaction, structure, width):
    ranker = _ranker(interaction, structure)
    assert ranker.inter_arch.out_features == width
    batch = 5
    dense, sparse = torch.randn(batch, 4), torch.randn(batch, 12)
    hidden = ranker.over_arch(ranker.inter_arch(dense, sparse))
    logits, ratings = ranker.heads(hidden)
    assert logits.shape == ratings.shape == (batch,)


def test_dot_interaction_needs_one_embedding_width():
    with pytest.raises(TrecError, match="interaction: dot needs every embedding .* one width"):
        _ranker(Interaction.dot, tables={"item_id": TableConfig(embedding_dim=8)})
    _ranker(Interaction.dcn, tables={"item_id": TableConfig(embedding_dim=8)})  # dcn concatenates any widths


# --------------------------------------------------------------------------------------------
# negatives
# --------------------------------------------------------------------------------------------


def _known() -> Csr:
    # user 0 knows items {0, 1, 2}, user 1 knows {5}, user 2 nothing; catalog of 8 items.
    return Csr(np.array([0, 3, 4, 4]), np.array([0, 1, 2, 5]))


def test_random_negatives_avoid_known_items_and_are_reproducible():
    sampler = RankingNegativeSampler(_known(), num_items=8, per_positive=3)
    users, items = np.array([0, 1, 0, 2]), np.array([1, 5, 2, 7])
    labels, ratings = np.ones(4, np.float32), np.array([4, 5, 3, 1], np.float32)
    out = sampler(users, items, labels, ratings, np.random.default_rng(3))
    again = sampler(users, items, labels, ratings, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(out, again))
    all_users, all_items, all_labels, all_ratings = out
    assert len(all_users) == 4 * 4
    assert np.array_equal(all_users[4:], np.repeat(users, 3))  # same user, positive-major
    assert all_labels.tolist() == [1] * 4 + [0] * 12 and all_ratings[4:].tolist() == [0] * 12
    assert not sampler.is_known(all_users[4:], all_items[4:]).any()


def test_hard_negatives_come_from_the_users_candidates_in_the_configured_share():
    sampler = RankingNegativeSampler(_known(), num_items=8, per_positive=4, hard_ratio=0.5)
    # hard candidates: user 0 → {6, 7, 1 (known: skipped)}, user 1 → none (random fallback).
    sampler.set_hard_candidates(Csr(np.array([0, 3, 3, 3]), np.array([6, 7, 1])))
    negatives = sampler.negatives(np.array([0] * 50 + [1] * 50), np.random.default_rng(0))
    assert set(negatives[:50, :2].reshape(-1).tolist()) == {6, 7}  # 2 of 4 hard, never the known 1
    assert not set(negatives[:50, 2:].reshape(-1).tolist()) & {0, 1, 2}
    assert not set(negatives[50:].reshape(-1).tolist()) & {5}


def test_popular_negatives_follow_training_popularity_in_the_configured_share():
    counts = np.array([0, 0, 0, 1000, 0, 0, 100, 0])  # item 3 ten times as popular as item 6
    sampler = RankingNegativeSampler(_known(), num_items=8, per_positive=4, popular_ratio=0.5, item_counts=counts)
    negatives = sampler.negatives(np.array([2] * 4000), np.random.default_rng(0))
    popular, uniform = negatives[:, :2].reshape(-1), negatives[:, 2:].reshape(-1)
    share = np.bincount(popular, minlength=8) / len(popular)
    expected = (counts + 1) / (counts + 1).sum()
    assert np.abs(share - expected).max() < 0.01  # P ∝ count + 1
    assert np.abs(np.bincount(uniform, minlength=8) / len(uniform) - 1 / 8).max() < 0.02
    known_user = sampler.negatives(np.array([1] * 2000), np.random.default_rng(1))
    assert 5 not in known_user  # never one of the user's own items


def test_held_out_rows_are_fixed_and_never_known(ml100k_prepared):
    from trec.data import PreparedDataset

    dataset = PreparedDataset.open(ml100k_prepared)
    users, items, labels, ratings = held_out_rows(dataset, "val", 3, 5)
    again = held_out_rows(dataset, "val", 3, 5)
    assert np.array_equal(items, again[1])
    positives = dataset.num_rows("val")
    assert len(users) == 4 * positives and labels.sum() == positives and (ratings[:positives] >= 1).all()
    known = RankingNegativeSampler(dataset.user_items(["train", "val", "test"]), dataset.num_items, 1)
    assert not known.is_known(users[positives:], items[positives:]).any()


# --------------------------------------------------------------------------------------------
# click metrics (torchrec.metrics)
# --------------------------------------------------------------------------------------------


def test_click_metrics_match_hand_computed_values():
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, -2.0])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    metrics = ClickMetrics(1, 0, max_rows=5, rating=True, device=torch.device("cpu"))
    metrics.update(logits[:3], labels[:3], torch.tensor([4.0, 0.0, 2.0]), torch.tensor([5.0, 0.0, 3.0]))
    metrics.update(logits[3:], labels[3:], torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    result = metrics.compute()
    p = torch.sigmoid(logits).tolist()
    y = labels.tolist()
    # AUC: share of (positive, negative) pairs ordered correctly: positives 2.0 and -1.0 vs 0.5, 0, -2
    assert result["auc"] == pytest.approx(4 / 6, abs=1e-6)
    logloss = -sum(math.log(q) if t else math.log(1 - q) for q, t in zip(p, y)) / 5
    base = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))  # entropy of the 2/5 click rate
    assert result["logloss"] == pytest.approx(logloss, rel=1e-5)
    assert result["ne"] == pytest.approx(logloss / base, rel=1e-5)
    assert result["calibration"] == pytest.approx(sum(p) / 2, rel=1e-5)
    assert result["rating_mse"] == pytest.approx(((4 - 5) ** 2 + (2 - 3) ** 2) / 2)  # positives only


def test_format_metrics_prints_scalar_metrics_without_a_ranking_table():
    text = format_metrics({"auc": 0.91, "logloss": 0.3, "val/auc": 0.9, "step": 10, "train_seconds": 3.0})
    assert "auc" in text and "0.9100" in text and "logloss" in text
    assert "val/auc" not in text and "train_seconds" not in text
    assert "ndcg@10" in format_metrics({"ndcg@10": 0.4, "popularity/ndcg@10": 0.2})


def test_two_stage_refuses_a_run_on_another_dataset(ml100k, ml100k_prepared, tmp_path):
    import shutil

    from data_pipeline.prepare import prepare_dataset
    from data_pipeline.sources.movielens import MovieLensSource
    from trec.config import PrepareConfig
    from trec.data import PreparedDataset
    from trec.two_stage import check_same_dataset

    dataset = PreparedDataset.open(ml100k_prepared)
    where = tmp_path / "runs" / "dcn" / "config.yaml"
    check_same_dataset(ml100k_prepared, dataset, where)  # the same directory
    shutil.copytree(ml100k_prepared, tmp_path / "copy")
    check_same_dataset(tmp_path / "copy", dataset, where)  # a copy of the same files
    other = tmp_path / "other"  # the same source, split with another seed
    prepare_dataset(MovieLensSource(str(ml100k)), other, PrepareConfig(test_fraction=0.25, val_fraction=0.1, seed=7))
    with pytest.raises(TrecError, match=r"config.yaml: data.path .*other is not the dataset .* \(different files\)"):
        check_same_dataset(other, dataset, where)
