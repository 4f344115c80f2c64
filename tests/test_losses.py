"""Retrieval losses on tiny inputs whose values are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trec.losses import accidental_hits, candidate_log_q, keep_hardest, pointwise_bce_loss, sampled_softmax_loss


def test_sampled_softmax_matches_hand_computation():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # 2 positives + 1 extra
    items = torch.tensor([10, 11, 12])
    loss = sampled_softmax_loss(user, candidates, items, 1.0)
    # row 0 logits [1, 0, 1] target 0; row 1 logits [0, 2, 1] target 1
    row0 = -1 + math.log(math.e + 1 + math.e)
    row1 = -2 + math.log(1 + math.e**2 + math.e)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_temperature_scales_logits():
    user = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = sampled_softmax_loss(user, candidates, torch.tensor([1, 2]), 10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-10)), rel=1e-3)  # float32 near 0


def test_log_q_is_subtracted_from_every_logit():
    user = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_q = torch.tensor([math.log(0.5), math.log(0.1)])
    loss = sampled_softmax_loss(user, candidates, torch.tensor([1, 2]), 1.0, log_q=log_q)
    logits = [1 - math.log(0.5), 0 - math.log(0.1)]
    assert loss.item() == pytest.approx(-logits[0] + math.log(sum(math.exp(x) for x in logits)), rel=1e-6)


def test_candidate_log_q_combines_in_batch_and_extra_sampling():
    item_probability = torch.tensor([0.5, 0.3, 0.2])
    extra_probability = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    items = torch.tensor([0, 2, 1])  # 2 positives, 1 extra
    log_q = candidate_log_q(items, item_probability, extra_probability, num_positives=2)
    expected = [2 * 0.5 + 1 / 3, 2 * 0.2 + 1 / 3, 2 * 0.3 + 1 / 3]
    assert log_q.tolist() == pytest.approx([math.log(x) for x in expected], rel=1e-5)


def test_accidental_hits_mask_other_copies_of_the_positive():
    items = torch.tensor([7, 8, 7, 9, 7])  # rows 0 and 2 share item 7; extras 9 and 7
    hits = accidental_hits(items, num_positives=3)
    assert hits.tolist() == [
        [False, False, True, False, True],
        [False, False, False, False, False],
        [True, False, False, False, True],
    ]


def test_masked_duplicate_equals_dropping_that_candidate():
    torch.manual_seed(0)
    user = torch.randn(2, 4)
    candidates = torch.randn(3, 4)
    candidates[2] = candidates[0]  # an extra candidate that is row 0's positive item
    items = torch.tensor([5, 6, 5])
    masked = sampled_softmax_loss(user, candidates, items, 1.0, mask_hits=True)
    row0 = torch.nn.functional.cross_entropy((user[:1] @ candidates[:2].T), torch.tensor([0]))
    row1 = torch.nn.functional.cross_entropy((user[1:] @ candidates.T), torch.tensor([1]))
    assert masked.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-5)


def test_keep_hardest_keeps_in_batch_and_top_extras():
    logits = torch.tensor([[5.0, 1.0, 0.1, 3.0, 2.0], [0.0, 4.0, 9.0, -1.0, 0.5]])
    kept = keep_hardest(logits, num_positives=2, num_hard=2)
    assert kept.tolist() == [[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 9.0, 0.5]]


def test_pointwise_bce_balances_positives_and_negatives():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    loss = pointwise_bce_loss(user, candidates, torch.tensor([1, 2, 3]), 1.0)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    positive = softplus(-1)  # both positives score 1
    negative = (softplus(0) * 4) / 4  # the four negative pairs all score 0
    assert loss.item() == pytest.approx(positive + negative, rel=1e-6)
