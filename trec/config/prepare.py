"""Options of `trec data prepare`: the `data.prepare` section (columns of generic logs, split, ID mapping)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trec.config.types import Choice


class SplitKind(Choice):
    stratified = "stratified"
    """Per user, a seeded random test_fraction of the user's interactions go to test."""
    temporal = "temporal"
    """One global time cut: the latest test_fraction of all interactions go to test."""
    leave_last_n = "leave-last-n"
    """Per user, the last_n most recent interactions go to test."""


class IdMapping(Choice):
    vocab = "vocab"
    """Contiguous indices by descending frequency, plus one out-of-vocabulary index."""
    hash = "hash"
    """A stable 64-bit hash into hash_buckets (for unbounded ID spaces); no vocabulary kept."""
    managed = "managed"
    """Stable 40-bit hashes of the raw IDs; the model's managed-collision remapper (LFU/LRU) gives
    them rows of a zch_size-row table as they stream in (two_tower only)."""


class Duplicates(Choice):
    keep = "keep"
    drop = "drop"


@dataclass
class ColumnsConfig:
    """Column names of a generic interaction log (`parquet` and `csv` sources)."""

    user: str = "user_id"
    """Raw user ID column (integers or strings)."""
    item: str = "item_id"
    """Raw item ID column (integers or strings)."""
    time: str = "timestamp"
    """Event time: integer seconds, or a Parquet/ISO-8601 timestamp; empty = no time (source order)."""
    rating: str = ""
    """Optional explicit rating (a number >= 0), kept beside the label."""
    label: str = ""
    """Optional label in [0, 1]; without it every interaction is a positive (1.0)."""
    user_features: list[str] = field(default_factory=list)
    """Categorical user columns (the value on the user's last row in source order is kept)."""
    user_multi_hot_features: list[str] = field(default_factory=list)
    """Multi-valued user columns: lists, or strings split by multi_hot_separator."""
    user_numeric_features: list[str] = field(default_factory=list)
    item_features: list[str] = field(default_factory=list)
    item_multi_hot_features: list[str] = field(default_factory=list)
    item_numeric_features: list[str] = field(default_factory=list)
    item_title: str = ""
    """Optional display title column of items."""
    context_features: list[str] = field(default_factory=list)
    """Categorical columns that belong to the interaction itself (device, hour, ...)."""
    multi_hot_separator: str = "|"
    csv_delimiter: str = ","
    id_type: str = "auto"
    """CSV only: auto (integers if the first rows are integers, else strings), int or string."""


@dataclass
class SyntheticConfig:
    """Power-law interactions with latent topic preferences (`trec data prepare synthetic`)."""

    users: int = 100_000
    items: int = 20_000
    interactions: int = 1_000_000
    side_features: int = 4
    """Categorical side features, alternating user/item, each correlated with the latent topics."""
    zipf: float = 1.1
    """Exponent of item popularity (rank r has weight 1/r^zipf); users follow zipf/2."""
    topics: int = 32
    """Latent topics; each user prefers one, each item belongs to one."""


@dataclass
class PrepareConfig:
    """Options of `trec data prepare` (each also a command-line flag)."""

    split: SplitKind = SplitKind.stratified
    test_fraction: float = 0.25
    """Share of each user's interactions (stratified) or of all interactions (temporal) in test."""
    val_fraction: float = 0.0
    """Per user, a seeded random share of the train part moved to val (for early stopping)."""
    last_n: int = 1
    """leave-last-n: interactions per user held out for test."""
    seed: int = 42
    id_mapping: IdMapping = IdMapping.vocab
    """Mapping of user_id and item_id."""
    hash_buckets: int = 1 << 20
    """Buckets of hash-mapped user_id/item_id."""
    zch_size: int = 1 << 20
    """managed: rows of the user_id and item_id tables (model.tables.NAME.zch_size overrides per table)."""
    hash_features: list[str] = field(default_factory=list)
    """Side or context features to hash instead of vocab-map, as NAME:BUCKETS."""
    min_count: int = 1
    """Drop interactions of users/items seen fewer times; rarer side-feature values map to OOV."""
    duplicates: Duplicates = Duplicates.keep
    """drop: keep only the first (in source order) interaction of each (user, item) pair."""
    history_max_len: int = 200
    """Most recent train items kept per user in features/user_history.parquet; 0 = no history."""
    rows_per_shard: int = 1_000_000
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
