"""The `model.dcn` section: interaction arch, MLP widths, negatives and the wide cross."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trec.config.types import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY_OPEN, SEED, Choice, Range


class Interaction(Choice):
    dcn = "dcn"
    dot = "dot"
    none = "none"


class CrossStructure(Choice):
    stacked = "stacked"
    parallel = "parallel"


class RankingLoss(Choice):
    pointwise = "pointwise"
    pairwise = "pairwise"


@dataclass
class DCNConfig:
    interaction: Interaction = Interaction.dcn
    """Feature interaction: dcn (DCN-v2 cross network), dot (DLRM pairwise dots), none (plain MLP)."""
    structure: CrossStructure = CrossStructure.stacked
    """Stacked: cross network then top MLP; parallel: cross network beside a deep MLP."""
    cross_layers: int = 3
    """Number of cross layers."""
    low_rank: int = 64
    """Rank of each cross layer's weight (W = U V^T)."""
    dense_layers: list[int] = field(default_factory=lambda: [128, 64])
    """Bottom MLP over the numeric features; with interaction dot its last width must equal the
    (common) embedding width."""
    top_layers: list[int] = field(default_factory=lambda: [256, 128])
    """Top (over) MLP widths before the output heads; with structure parallel, the deep MLP
    beside the cross network."""
    dropout: float = 0.0
    """Dropout on the interaction input (the concatenated embeddings), for small datasets."""
    wide_cross: bool = False
    """Add a wide (Wide & Deep) full-rank cross of the user's history with the candidate item to
    the click logit: a table whose row for item i holds one weight per history item j, read at the
    user's history and averaged. It learns item-to-item affinities (as EASE/SLIM do) that pooled
    low-rank embeddings cannot; the table is items X wide_cross_buckets."""
    wide_cross_buckets: int = 0
    """Columns of the wide table; 0 = one per item (exact: I^2 weights, for catalogs up to ~20k
    items), else history items share columns by index modulo this (for large catalogs)."""
    loss: RankingLoss = RankingLoss.pointwise
    """Click loss: pointwise (BCE over every row) or pairwise (RankNet/BPR: mean softplus(s_n - s_p)
    over every (positive, negative) pair of rows of one user in the batch; users without both
    add nothing). Pairwise logits are not calibrated: log loss and calibration lose their meaning."""
    rating_weight: float = 0.0
    """Weight α of the rating head's loss (MSE on positives): L = L_click + α·L_rating; 0 = no
    rating head. Needs a dataset with ratings."""
    negatives_per_positive: int = 4
    """Negative (user, item) rows sampled per training positive, label 0."""
    hard_negative_ratio: float = 0.0
    """Share of those negatives drawn from the user's hard candidates (needs hard_negatives_run);
    the rest are uniform over the catalog. Neither kind is an item the user has in train."""
    popular_negative_ratio: float = 0.0
    """Share of the negatives drawn by training popularity (P ∝ positive train rows + 1) instead of
    uniformly: candidates to re-rank are mostly popular items, which uniform negatives rarely are."""
    hard_negatives_run: str = ""
    """Run directory of a trained two-tower: its top hard_negatives_top_n non-train items per user
    are the hard candidates, mined at the start of training and cached in RUN/hard_negatives.parquet."""
    hard_negatives_top_n: int = 100
    """Hard candidates kept per user (the retriever's highest-scored items not in train)."""
    hard_negatives_skip_top: int = 0
    """Skip the retriever's first S non-train items: the hard candidates are its ranks S+1..S+top_n
    (semi-hard negatives that stay out of the top-S list the ranker will re-rank)."""
    retrieval_weight: float = 0.0
    """Two-stage order of the candidates: ranker click logit + retrieval_weight X the retriever's
    score (the towers' inner product, a cosine for normalised towers); 0 = the ranker alone.
    Choose it on the validation split (`trec evaluate --split val ... --set model.dcn.retrieval_weight=W`)."""
    eval_negatives: int = 4
    """Validation/test: uniform negatives per held-out positive (none of the user's items in any
    split), drawn with eval_seed so every model variant is scored on the same rows."""
    eval_seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "cross_layers": NON_NEGATIVE,
        "low_rank": POSITIVE,
        "dense_layers[]": POSITIVE,
        "top_layers[]": POSITIVE,
        "dropout": PROBABILITY_OPEN,
        "wide_cross_buckets": NON_NEGATIVE,
        "rating_weight": NON_NEGATIVE,
        "negatives_per_positive": NON_NEGATIVE,
        "hard_negative_ratio": FRACTION,
        "popular_negative_ratio": FRACTION,
        "hard_negatives_top_n": POSITIVE,
        "hard_negatives_skip_top": NON_NEGATIVE,
        "eval_negatives": NON_NEGATIVE,
        "eval_seed": SEED,
    }
    """Allowed values, checked when the config is built (trec.config.validation)."""
