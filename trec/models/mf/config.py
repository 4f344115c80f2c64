"""The `model.mf` section: the loss, its negatives and the L2 penalty of matrix factorization.

The embedding width is the common ``model.embedding_dim`` (or a ``model.tables`` override of
``user_id`` / ``item_id``; both must be equal, as the score is their dot product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trec.config.types import FRACTION, NON_NEGATIVE, POSITIVE, Choice, Range


class MFLoss(Choice):
    bpr = "bpr"
    """Bayesian personalised ranking (Rendle et al., 2009): -log sigmoid(s_pos - s_neg) for each
    positive row against each sampled item."""
    softmax = "softmax"
    """In-batch sampled softmax (plus the sampled items), with optional logQ correction."""


@dataclass
class MFConfig:
    loss: MFLoss = MFLoss.bpr
    """Training loss: bpr (pairwise, against the sampled items) or softmax (listwise, against the
    batch's other positives and the sampled items)."""
    num_negatives: int = 256
    """Items drawn per step and shared by the whole batch: each positive row's negatives (bpr) or
    the extra softmax candidates (softmax)."""
    popular_share: float = 0.0
    """Share of the sampled items drawn by popularity (training frequency); the rest are uniform."""
    l2: float = 0.0
    """L2 penalty on the embeddings the step looks up: ``l2 * (|u|² + |v_pos|² + mean |v_neg|²)``,
    averaged over the positive rows (BPR-MF's regulariser; frequent users and items are
    penalised more often, unlike decay of the whole table)."""
    temperature: float = 1.0
    """Softmax only: the logits are ``<u, v> / temperature``."""
    logq_correction: bool = True
    """Softmax only: subtract log(sampling probability) from each candidate's logit (Yi et al., 2019)."""
    mask_accidental_hits: bool = True
    """Drop a negative (or candidate) that is the row's own positive item."""

    RANGES: ClassVar[dict[str, Range]] = {
        "num_negatives": POSITIVE,
        "popular_share": FRACTION,
        "l2": NON_NEGATIVE,
        "temperature": Range(0, low_open=True),
    }
    """Allowed values, checked when the config is built (trec.config.validation)."""
