"""Retrieval losses over a batch of B positives and C = B + N candidate items.

The candidates are the batch's own positive items (in-batch negatives for every other row)
followed by N extra items drawn by a sampler. Both samplers favour some items (in-batch
negatives follow item popularity), so each logit is corrected by the log of the expected
number of times its item appears among the candidates (logQ correction, Yi et al. RecSys'19);
without it the model mostly learns to demote popular items.
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
) -> torch.Tensor:
    """log E[#times each candidate's item is drawn] under in-batch + extra sampling.

    Args:
        candidate_items: (C,) item indices of the candidates (first B are the positives).
        item_probability: (I,) probability of an item being a training positive.
        extra_probability: (I,) per-draw probability of the extra-negative sampler, or None.
        num_positives: B.
    Returns:
        (C,) float log expected counts.
    """
    expected = num_positives * item_probability[candidate_items]
    if extra_probability is not None:
        # No branch on the number of extras: the model's forward must stay fx-traceable.
        num_extra = candidate_items.shape[0] - num_positives
        expected = expected + num_extra * extra_probability[candidate_items]
    return torch.log(expected.clamp_min(1e-12))


def accidental_hits(candidate_items: torch.Tensor, num_positives: int) -> torch.Tensor:
    """(B, C) bool: candidate j carries row i's positive item but is not row i's own positive."""
    hits = candidate_items[:num_positives, None] == candidate_items[None, :]
    return hits.fill_diagonal_(False)


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
    Returns:
        scalar mean loss.
    """
    num_positives = user.shape[0]
    logits = scaled_logits(user, candidates, inverse_temperature, log_q)
    if mask_hits:
        logits = logits.masked_fill_(accidental_hits(candidate_items, num_positives), _MASKED)
    if num_hard is not None:
        logits = keep_hardest(logits, num_positives, num_hard)
    target = torch.arange(num_positives, device=logits.device)
    return F.cross_entropy(logits, target)


def pointwise_bce_loss(
    user: torch.Tensor,
    candidates: torch.Tensor,
    candidate_items: torch.Tensor,
    inverse_temperature: torch.Tensor | float,
    mask_hits: bool = True,
) -> torch.Tensor:
    """Binary cross-entropy: each row's positive is 1, every other candidate is 0.

    Positives and negatives are averaged separately and summed, so the loss does not depend
    on how many negatives a batch carries. Shapes as in :func:`sampled_softmax_loss`.
    """
    num_positives = user.shape[0]
    logits = scaled_logits(user, candidates, inverse_temperature, None)
    own = torch.eye(num_positives, candidates.shape[0], dtype=torch.bool, device=logits.device)
    per_pair = F.binary_cross_entropy_with_logits(logits, own.float(), reduction="none")
    negatives = ~own
    if mask_hits:
        negatives = negatives & ~accidental_hits(candidate_items, num_positives)
    positive_loss = per_pair[own].mean()
    negative_loss = (per_pair * negatives).sum() / negatives.sum().clamp_min(1)
    return positive_loss + negative_loss
