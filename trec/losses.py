"""Retrieval losses over a batch of B positives and C = B + N candidate items.

The candidates are the batch's own positive items (in-batch negatives for every other row)
followed by N extra items drawn by a sampler. Both samplers favour some items (in-batch
negatives follow item popularity), so each logit is corrected by the log of the expected
number of times its item appears among the candidates (logQ correction, Yi et al. RecSys'19);
without it the model mostly learns to demote popular items.

Rows of a batch that are not positives (label below data.positive_threshold) carry weight 0:
they add nothing to the loss and their item is no candidate for the other rows, so the in-batch
candidates are exactly the batch's positives, as the positive-only item counts behind logQ assume.
The reader cannot drop those rows instead: every rank must read the same number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MASKED = -1e9  # finite, so a fully masked row cannot produce NaN in log-softmax


def candidate_log_q(
    candidate_items: torch.Tensor,
    item_probability: torch.Tensor,
    extra_probability: torch.Tensor | None,
    num_positives: int,
    num_in_batch: torch.Tensor | None = None,
) -> torch.Tensor:
    """log E[#times each candidate's item is drawn] under in-batch + extra sampling.

    Args:
        candidate_items: (C,) item indices of the candidates (first B are the batch's rows).
        item_probability: (I,) probability of an item being a training positive.
        extra_probability: (I,) per-draw probability of the extra-negative sampler, or None.
        num_positives: B.
        num_in_batch: scalar count of the B rows that are candidates (the positive rows);
            default B.
    Returns:
        (C,) float log expected counts.
    """
    draws = num_positives if num_in_batch is None else num_in_batch
    expected = draws * item_probability[candidate_items]
    if extra_probability is not None:
        # No branch on the number of extras: the model's forward must stay fx-traceable.
        num_extra = candidate_items.shape[0] - num_positives
        expected = expected + num_extra * extra_probability[candidate_items]
    return torch.log(expected.clamp_min(1e-12))


def accidental_hits(candidate_items: torch.Tensor, num_positives: int) -> torch.Tensor:
    """(B, C) bool: candidate j carries row i's positive item but is not row i's own positive."""
    hits = candidate_items[:num_positives, None] == candidate_items[None, :]
    return hits.fill_diagonal_(False)


def non_positive_columns(row_weights: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """(B, C) bool: candidate j < B belongs to a row of weight 0 (not a positive), off the diagonal.

    Built from ``eye`` rather than by padding, so the forward stays fx-traceable.
    """
    own = torch.eye(row_weights.shape[0], num_candidates, dtype=torch.bool, device=row_weights.device)
    dropped = (own & (row_weights <= 0)[:, None]).any(dim=0)
    return dropped[None, :] & ~own


def excluded_candidates(candidate_items: torch.Tensor, num_positives: int, mask_hits: bool,
                        row_weights: torch.Tensor | None) -> torch.Tensor | None:
    """(B, C) bool: the union of :func:`accidental_hits` (with ``mask_hits``) and
    :func:`non_positive_columns` (with ``row_weights``), or None when neither applies.

    One mask, so the B X C logits are filled once forward and once backward; the non-positive
    columns come from a (C,) vector instead of a B X C ``eye``.
    """
    excluded = None
    if mask_hits:
        excluded = candidate_items[:num_positives, None] == candidate_items[None, :]
    if row_weights is not None:
        # (C,): the positions of the B rows' own items whose row is no positive; never the N extras.
        extras = torch.zeros_like(candidate_items[num_positives:], dtype=torch.bool)
        dropped = torch.cat([row_weights <= 0, extras])
        excluded = dropped[None, :].repeat(num_positives, 1) if excluded is None else excluded | dropped[None, :]
    return None if excluded is None else excluded.fill_diagonal_(False)


def scaled_logits(user, candidates, inverse_temperature, log_q: torch.Tensor | None) -> torch.Tensor:
    """(B, C) logits ``<u, v> / T - log_q``, computed in one pass over the B X C matrix.

    The temperature scales the B X D side and the logQ term is added by ``addmm`` itself: at a
    batch of thousands, every extra pass over B X C costs more than the matmul.
    """
    if log_q is None:
        return (user * inverse_temperature) @ candidates.T
    return torch.addmm(-log_q[None, :], user * inverse_temperature, candidates.T)


def keep_hardest(logits: torch.Tensor, num_positives: int, num_hard: int) -> torch.Tensor:
    """Keep the B in-batch columns and, of the N extra columns, each row's ``num_hard`` highest.

    Args:
        logits: (B, B + N) scores with hits already masked; ``1 <= num_hard <= N``, decided by
            the caller from its config (no branching on shapes here: the model's forward must
            stay fx-traceable for the sparse-dist pipeline).
    Returns:
        (B, B + num_hard) logits; column i is still row i's positive.
    """
    hardest = logits[:, num_positives:].topk(num_hard, dim=1).values
    return torch.cat([logits[:, :num_positives], hardest], dim=1)


def sampled_softmax_loss(
    user: torch.Tensor,
    candidates: torch.Tensor,
    candidate_items: torch.Tensor,
    inverse_temperature: torch.Tensor | float,
    log_q: torch.Tensor | None = None,
    mask_hits: bool = True,
    num_hard: int | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of each row's positive against all other candidates.

    Args:
        user: (B, D) query embeddings.
        candidates: (C, D) item embeddings, C = B + N; row i's positive is candidate i.
        candidate_items: (C,) item indices (for accidental-hit masking).
        inverse_temperature: scalar 1/T.
        log_q: (C,) logQ correction subtracted from every logit, or None.
        mask_hits: mask candidates equal to the row's positive item (other than itself).
        num_hard: if set, only the ``num_hard`` highest-scored extra candidates per row are
            kept as negatives (hard-negative mining from the current model's scores).
        row_weights: (B,) weight of each row's loss; a row of weight 0 is not a positive and its
            item is no candidate for the other rows. None: every row weighs 1.
    Returns:
        scalar loss: ``sum(w * ce) / sum(w)`` (the mean when unweighted; 0 when every w is 0).
    """
    num_positives = user.shape[0]
    logits = scaled_logits(user, candidates, inverse_temperature, log_q)
    excluded = excluded_candidates(candidate_items, num_positives, mask_hits, row_weights)
    if excluded is not None:
        logits = logits.masked_fill_(excluded, _MASKED)
    if num_hard is not None:
        logits = keep_hardest(logits, num_positives, num_hard)
    target = torch.arange(num_positives, device=logits.device)
    if row_weights is None:
        return F.cross_entropy(logits, target)
    per_row = F.cross_entropy(logits, target, reduction="none")
    return (per_row * row_weights).sum() / row_weights.sum().clamp_min(1e-12)


def pointwise_bce_loss(
    user: torch.Tensor,
    candidates: torch.Tensor,
    candidate_items: torch.Tensor,
    inverse_temperature: torch.Tensor | float,
    mask_hits: bool = True,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy: each row's positive is 1, every other candidate is 0.

    Positives and negatives are averaged separately and summed, so the loss does not depend
    on how many negatives a batch carries. Shapes and ``row_weights`` as in
    :func:`sampled_softmax_loss` (a row's negatives weigh what its positive does).
    """
    num_positives = user.shape[0]
    logits = scaled_logits(user, candidates, inverse_temperature, None)
    own = torch.eye(num_positives, candidates.shape[0], dtype=torch.bool, device=logits.device)
    per_pair = F.binary_cross_entropy_with_logits(logits, own.float(), reduction="none")
    negatives = ~own
    if mask_hits:
        negatives = negatives & ~accidental_hits(candidate_items, num_positives)
    if row_weights is not None:
        negatives = negatives & ~non_positive_columns(row_weights, candidates.shape[0])
        pair_weights = negatives * row_weights[:, None]
        positive_loss = (per_pair.diagonal() * row_weights).sum() / row_weights.sum().clamp_min(1e-12)
        return positive_loss + (per_pair * pair_weights).sum() / pair_weights.sum().clamp_min(1e-12)
    positive_loss = per_pair[own].mean()
    negative_loss = (per_pair * negatives).sum() / negatives.sum().clamp_min(1)
    return positive_loss + negative_loss
