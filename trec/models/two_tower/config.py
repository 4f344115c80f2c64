"""The `model.two_tower` section: tower widths, normalisation, temperature and the retrieval loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trec.config.types import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY_OPEN, Choice, Range


class RetrievalLoss(Choice):
    softmax = "softmax"
    """In-batch sampled softmax (plus extra negatives), with logQ correction."""
    bce = "bce"
    """Pointwise binary cross-entropy on positives and sampled negatives (for comparison)."""


class NegativeStrategy(Choice):
    none = "none"
    random = "random"
    popular = "popular"
    hard = "hard"
    mixed = "mixed"


@dataclass
class RetrievalLossConfig:
    kind: RetrievalLoss = RetrievalLoss.softmax
    """Loss of the two-tower task."""
    logq_correction: bool = True
    """Subtract log(sampling probability) from each candidate's logit (Yi et al., 2019)."""
    mask_accidental_hits: bool = True
    """Drop a candidate from a row's negatives when it is that row's positive item."""
    negatives: NegativeStrategy = NegativeStrategy.random
    """Extra negatives beyond the in-batch ones: random (uniform over the catalog), popular (by
    frequency), hard (highest-scored non-positives of the current model), mixed (a blend)."""
    num_negatives: int = 1024
    """Extra candidate items drawn per step (shared by the whole batch)."""
    num_hard_negatives: int = 10
    """For hard/mixed: how many of the highest-scored candidates each row keeps as hard negatives."""
    mix_popular: float = 0.5
    """For mixed: share of the extra candidates drawn by popularity; the rest are uniform."""
    label_weighting: bool = False
    """Weight each positive row's loss by its (graded) label instead of 1; rows below
    data.positive_threshold weigh 0 either way."""


@dataclass
class TwoTowerConfig:
    tower_layers: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden widths of each tower's MLP (torchrec.modules.mlp.MLP)."""
    output_dim: int = 64
    """Width D of the user and item embeddings (B X D)."""
    dense_dim: int = 16
    """Width of the small MLP that maps a tower's numeric features into its input."""
    normalize: bool = True
    """L2-normalise both towers' outputs, so the score is a cosine scaled by 1/temperature."""
    temperature: float = 0.05
    """Softmax temperature (initial value if learned)."""
    learn_temperature: bool = False
    """Learn the temperature (as log 1/T, clamped) instead of fixing it."""
    dropout: float = 0.0
    """Dropout on the towers' input embeddings (regularisation for small datasets)."""
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)

    RANGES: ClassVar[dict[str, Range]] = {
        "tower_layers[]": POSITIVE,
        "output_dim": POSITIVE,
        "dense_dim": POSITIVE,
        "temperature": Range(0, low_open=True),
        "dropout": PROBABILITY_OPEN,
        "loss.num_negatives": NON_NEGATIVE,
        "loss.num_hard_negatives": NON_NEGATIVE,
        "loss.mix_popular": FRACTION,
    }
    """Allowed values, checked when the config is built (trec.config.validation)."""
