"""Ranking metrics against values computed by hand on a tiny fixed example."""

from __future__ import annotations

import math

import pytest
import torch

from trec.metrics import RankingAccumulator, intra_list_diversity, ranking_metrics, topk_hits

NUM_ITEMS = 10
# user 0 is recommended [5, 2, 7] and has relevant {2, 7, 9}; user 1 gets [1, 3, 4] and has {1}.
TOPK = torch.tensor([[5, 2, 7], [1, 3, 4]])
RELEVANT = torch.tensor(sorted([0 * NUM_ITEMS + 2, 0 * NUM_ITEMS + 7, 0 * NUM_ITEMS + 9, 1 * NUM_ITEMS + 1]))
NUM_RELEVANT = torch.tensor([3, 1])


def test_hits():
    hits = topk_hits(TOPK, RELEVANT, NUM_ITEMS)
    assert hits.tolist() == [[False, True, True], [True, False, False]]


def test_per_user_metrics_at_3():
    m = ranking_metrics(topk_hits(TOPK, RELEVANT, NUM_ITEMS), NUM_RELEVANT, k=3)
    # user 0: DCG = 1/log2(3) + 1/log2(4); IDCG = 1 + 1/log2(3) + 1/log2(4)
    dcg0 = 1 / math.log2(3) + 1 / math.log2(4)
    assert m["precision"].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert m["recall"].tolist() == pytest.approx([2 / 3, 1.0])
    assert m["ndcg"].tolist() == pytest.approx([dcg0 / (1 + dcg0), 1.0])
    # AP@3: (P@2 + P@3) / min(3, 3) = (1/2 + 2/3) / 3
    assert m["map"].tolist() == pytest.approx([(1 / 2 + 2 / 3) / 3, 1.0])
    assert m["mrr"].tolist() == pytest.approx([1 / 2, 1.0])
    assert m["hit"].tolist() == [1.0, 1.0]


def test_per_user_metrics_at_1():
    m = ranking_metrics(topk_hits(TOPK, RELEVANT, NUM_ITEMS), NUM_RELEVANT, k=1)
    for name in ("precision", "recall", "ndcg", "map", "mrr", "hit"):
        assert m[name].tolist() == [0.0, 1.0], name


def test_map_divides_by_min_of_relevant_and_k():
    # 5 relevant items, only 2 slots: a perfect list has AP@2 = 1.
    m = ranking_metrics(torch.tensor([[True, True]]), torch.tensor([5]), k=2)
    assert m["map"].item() == pytest.approx(1.0)
    assert m["recall"].item() == pytest.approx(2 / 5)
    assert m["ndcg"].item() == pytest.approx(1.0)


def test_intra_list_diversity():
    embeddings = torch.zeros(NUM_ITEMS, 2)
    embeddings[5] = torch.tensor([1.0, 0.0])
    embeddings[2] = torch.tensor([2.0, 0.0])  # same direction as item 5: cosine 1
    embeddings[7] = torch.tensor([0.0, 3.0])  # orthogonal to both
    value = intra_list_diversity(torch.tensor([[5, 2, 7]]), embeddings, k=3)
    assert value.item() == pytest.approx(1 - 1 / 3)  # pairwise cosines 1, 0, 0


def test_accumulator_means_and_coverage():
    acc = RankingAccumulator([1, 3], NUM_ITEMS, torch.device("cpu"))
    hits = topk_hits(TOPK, RELEVANT, NUM_ITEMS)
    acc.add(TOPK[:1], hits[:1], NUM_RELEVANT[:1])  # two batches of one user each
    acc.add(TOPK[1:], hits[1:], NUM_RELEVANT[1:])
    result = acc.compute()
    dcg0 = 1 / math.log2(3) + 1 / math.log2(4)
    assert result["users"] == 2
    assert result["precision@3"] == pytest.approx(0.5)
    assert result["recall@3"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["ndcg@3"] == pytest.approx((dcg0 / (1 + dcg0) + 1) / 2)
    assert result["map@3"] == pytest.approx(((1 / 2 + 2 / 3) / 3 + 1) / 2)
    assert result["mrr@3"] == pytest.approx(0.75)
    assert result["ndcg@1"] == pytest.approx(0.5)
    assert result["coverage@3"] == pytest.approx(6 / 10)  # {5, 2, 7, 1, 3, 4}
    assert result["coverage@1"] == pytest.approx(2 / 10)  # {5, 1}
