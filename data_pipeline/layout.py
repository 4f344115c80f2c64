"""The prepared-dataset format: file names and constants shared by the writer and `trec.data`.

A prepared dataset is a directory::

    manifest.json                  schema, features, counts, checksums (see README "Data")
    train/part-00000.parquet ...   interactions: user_id, item_id, timestamp, label[, rating][, context features]
    val/part-*.parquet             only when val_fraction > 0
    test/part-*.parquet
    features/users.parquet         one row per user index 0..U-1
    features/items.parquet         one row per item index 0..I-1
    features/user_history.parquet  user_id, history (positive train items, oldest first); absent if history_max_len = 0
    mappings/<feature>.parquet     raw, index, count for every mapped categorical feature
"""

from __future__ import annotations

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
USERS_FILE = "features/users.parquet"
ITEMS_FILE = "features/items.parquet"
HISTORY_FILE = "features/user_history.parquet"

USER_ID = "user_id"
ITEM_ID = "item_id"
USER_HISTORY = "user_history"
TIMESTAMP = "timestamp"
LABEL = "label"
RATING = "rating"
TITLE = "title"
TRAIN_COUNT = "train_count"

# A row is a positive when its label is >= this (the default of data.positive_threshold). The
# user_history feature is written at prepare time from the positive train rows by this value.
DEFAULT_POSITIVE_THRESHOLD = 0.5

ENTITIES = ("user", "item", "context")

# Row groups of interaction shards: the reader's unit of I/O and of the block shuffle.
INTERACTION_ROW_GROUP = 65_536


def mapping_file(feature: str) -> str:
    return f"mappings/{feature}.parquet"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"
