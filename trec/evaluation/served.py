"""One user, as the single-user commands (``trec search``, ``trec recommend``) and serving resolve them:
their row, the items they are never recommended, and the popularity fallback."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.layout import SPLITS, USER_ID
from trec.data import PreparedDataset
from trec.errors import TrecError


@dataclass
class ServedUser:
    """A raw user ID resolved the one way both single-user commands resolve it."""

    raw: str
    index: int | None
    """The user's row; None for an unknown user (not in the dataset's ID mapping) or one with no
    positive training row (label >= data.positive_threshold): both get the popularity fallback
    (:func:`popular_items`)."""
    exclude_splits: list[str]
    """Splits whose items the user is never recommended: every split of the dataset, or none
    with ``include_seen``."""
    seen: np.ndarray
    """The items of ``exclude_splits`` for this user (sorted, unique; empty for an unknown user)."""


def check_k(k: int, num_items: int) -> None:
    """One line for a -k the catalog cannot fill, before anything sized by k is built."""
    if k < 1:
        raise TrecError(f"-k: expected a positive number, got {k}")
    if k > num_items:
        raise TrecError(f"k={k} exceeds the catalog of {num_items:,} items; use -k {num_items} or less")


def serve_user(dataset: PreparedDataset, raw_user: str, include_seen: bool = False) -> ServedUser:
    """Resolve ``raw_user`` and the items it must not be recommended (see :class:`ServedUser`).

    Seen items are those the dataset records for the user in any split (train, val and test):
    a served user is past the evaluation protocol, so everything they interacted with is known.
    On a hash-mapped dataset the user's row is its bucket, so IDs sharing it share exclusions.
    """
    splits = [] if include_seen else [split for split in SPLITS if dataset.has_split(split)]
    try:
        user = dataset.lookup_index(USER_ID, raw_user)
    except TrecError:
        return ServedUser(str(raw_user), None, splits, np.zeros(0, np.int64))
    seen = np.zeros(0, np.int64)
    if splits:
        seen = dataset.user_items(splits).row(user)
    # A user is personalised only with a positive training row: non-positive rows weigh 0 in the
    # retriever's loss, so a user with none has an untrained embedding and no history.
    known = len(dataset.user_items(["train"], positives=True).row(user)) > 0
    return ServedUser(str(raw_user), user if known else None, splits, seen)


def popularity_order(item_counts: np.ndarray) -> np.ndarray:
    """(I,) item indices by (I,) positive training count, most first (ties by index)."""
    return np.argsort(-np.asarray(item_counts), kind="stable")


def popular_items(order: np.ndarray, k: int, exclude: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """The first ``k`` items of ``order`` (:func:`popularity_order`) that are not in ``exclude`` and,
    given ``allowed`` ((I,) bool), allowed; most popular first (≤ k items)."""
    keep = ~np.isin(order, exclude)
    if allowed is not None:
        keep &= allowed[order]
    return order[keep][:k]
