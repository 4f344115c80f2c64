"""Batches for request-time users: a known user's stored features and history, or an unknown one
described by what the request sent.

Serving builds the user tower's and the ranker's batches here::

    users = [RequestUser(index=17), RequestUser(history=np.array([3, 9]), features={"user_age": 1.4})]
    batch = request_batch(dataset, users, np.arange(2), np.full(2, -1), history_max_len)  # user tower
    batch = request_batch(dataset, users, np.repeat([0, 1], n), candidates, history_max_len)  # ranker

A :class:`RequestUser` with ``index`` >= 0 starts from the dataset's row (features, history,
user_id); ``index`` -1 starts from nothing, with user_id at the out-of-vocabulary row (what an
ID never seen in training gets; a hash-mapped user_id has no such row, so the key stays empty).
Sent history is appended to the stored one (most recent last) before the last ``history_max_len``
are kept; sent features replace the stored ones. Context features are empty unless sent, which is
also what evaluation gives the user tower, so a request without context has no train/serve skew.
A known user sending nothing gets exactly :meth:`PreparedDataset.build_batch`'s rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from data_pipeline import layout as L
from data_pipeline.mapping import stable_hash
from trec.data.batch import FeatureSpec, RecBatch, keyed_jagged
from trec.data.csr import Csr
from trec.data.dataset import PreparedDataset


@dataclass
class RequestUser:
    """One user of a request, as the user tower and the ranker see them."""

    index: int = -1
    """The dataset's user row, or -1: user_id at its OOV row and no stored features or history."""
    history: np.ndarray | None = None
    """Item indices the user just interacted with (oldest first), appended to the stored history."""
    features: dict[str, np.ndarray | float] = field(default_factory=dict)
    """User side features replacing the stored ones: categorical → (N,) int64 indices (one for a
    single-hot feature), numeric → the raw value (standardised here)."""
    context: dict[str, int] = field(default_factory=dict)
    """Context feature → index; an absent one stays empty, as in evaluation."""


class Vocabulary:
    """raw value → index of one categorical feature, for request-time lookups (read once per feature).

    :meth:`known`: the index of a raw value the dataset has seen (its mapping file), else None.
    :meth:`index`: the same, except that a hash mapping hashes any other value to its bucket, as
    data preparation would have.
    """

    def __init__(self, dataset: PreparedDataset, name: str) -> None:
        base, table = dataset.mapping(name)
        self.name = name
        self.hashed = base.mapping == "hash"
        self.oov_index = base.oov_index
        self.buckets = int(base.cardinality)
        self.raw_type = table.schema.field("raw").type
        self._integer = pa.types.is_integer(self.raw_type)
        self._indices = dict(zip(table["raw"].to_pylist(), table["index"].to_pylist()))

    def _typed(self, raw: object) -> object | None:
        """``raw`` as the mapping's raw type (int or str); None when it cannot be one."""
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            return None
        if not self._integer:
            return str(raw)
        try:
            value = int(raw)
        except ValueError:
            return None
        return value if -(2**63) <= value < 2**63 else None

    def known(self, raw: object) -> int | None:
        value = self._typed(raw)
        return None if value is None else self._indices.get(value)

    def index(self, raw: object) -> int | None:
        found = self.known(raw)
        value = self._typed(raw)
        if found is None and self.hashed and value is not None:
            found = int(stable_hash(pa.array([value], self.raw_type))[0] % np.uint64(self.buckets))
        return found

    def index_or_oov(self, raw: object) -> int | None:
        """:meth:`index`, or the OOV row for a value outside the vocabulary (None: the feature has none)."""
        found = self.index(raw)
        return self.oov_index if found is None else found


def history_length(dataset: PreparedDataset, history_max_len: int | None) -> int:
    """The history items a row gets (0: the dataset or the model has no history), as build_batch decides."""
    specs = [f for f in dataset.features if f.name == L.USER_HISTORY]
    if not specs:
        return 0
    return (specs[0].max_len or 0) if history_max_len is None else max(int(history_max_len), 0)


def request_batch(dataset: PreparedDataset, users: Sequence[RequestUser], rows: np.ndarray, items: np.ndarray,
                  history_max_len: int | None) -> RecBatch:
    """A RecBatch of R = len(rows) labelled rows: row r is user ``users[rows[r]]`` (-1: no user) with
    item ``items[r]`` (-1: no item). Labels are 0 (only the encoders and the ranker read these)."""
    rows = np.asarray(rows, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if rows.shape != items.shape or rows.ndim != 1:
        raise ValueError(f"rows and items must be equal-length vectors, got {rows.shape} and {items.shape}")
    count = len(rows)
    stored_users = np.array([user.index for user in users], dtype=np.int64)
    # The users' own rows (features, history), and the items' rows: each built once, then gathered.
    stored = dataset.build_batch(stored_users, np.full(len(users), -1, np.int64), np.zeros(0, np.float32),
                                 history_max_len=history_max_len)
    item_rows = dataset.build_batch(np.full(count, -1, np.int64), items, np.zeros(count, np.float32),
                                    history_max_len=history_max_len)
    user_keys, item_keys = stored.sparse_features.to_dict(), item_rows.sparse_features.to_dict()
    max_len = history_length(dataset, history_max_len)
    lengths, values = [], []
    for spec in dataset.sparse_features:
        if spec.entity == "item":
            jagged = item_keys[spec.name]
            key_lengths, key_values = jagged.lengths().numpy(), jagged.values().numpy()
        else:
            jagged = user_keys[spec.name]
            per_user = _user_values(spec, users, jagged.lengths().numpy(), jagged.values().numpy(), max_len,
                                    lambda items: dataset.model_ids(dataset.feature(L.ITEM_ID), items))
            key_lengths, key_values = per_user.rows(rows)
        lengths.append(key_lengths)
        values.append(key_values)
    kjt = keyed_jagged([spec.name for spec in dataset.sparse_features], lengths, values, count)
    # User and item numeric columns are disjoint (zeros where a row has no such entity): their sum.
    user_dense = _user_dense(dataset, users, stored.dense_features.numpy())
    dense = np.where((rows >= 0)[:, None], user_dense[np.maximum(rows, 0)], 0.0) if len(users) else 0.0
    return RecBatch(
        dense_features=torch.from_numpy((item_rows.dense_features.numpy() + dense).astype(np.float32)),
        sparse_features=kjt,
        labels=torch.zeros(count),
        ratings=torch.zeros(count),
    )


def _user_values(spec: FeatureSpec, users: Sequence[RequestUser], lengths: np.ndarray, values: np.ndarray,
                 max_len: int, model_items=lambda items: items) -> Csr:
    """One user-side key's values per request user (a Csr of len(users) rows): stored, then what was sent
    (sent history items through ``model_items``: catalog indices → what the model's KJT carries)."""
    offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stored = Csr(offsets, values)
    changed = {}
    for position, user in enumerate(users):
        if spec.entity == "context":
            if spec.name in user.context:
                changed[position] = np.array([user.context[spec.name]], np.int64)
        elif spec.name == L.USER_ID and user.index < 0:
            changed[position] = np.zeros(0, np.int64) if spec.oov_index is None else np.array([spec.oov_index])
        elif spec.name == L.USER_HISTORY and user.history is not None and len(user.history):
            history = np.concatenate([stored.row(position), model_items(np.asarray(user.history, np.int64))])
            changed[position] = history[max(len(history) - max_len, 0):] if max_len > 0 else history[:0]
        elif spec.name in user.features:
            changed[position] = np.atleast_1d(np.asarray(user.features[spec.name], np.int64))
    if not changed:
        return stored
    parts = [changed.get(position, stored.row(position)) for position in range(len(users))]
    new_offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum([len(part) for part in parts], out=new_offsets[1:])
    return Csr(new_offsets, np.concatenate(parts).astype(np.int64))


def _user_dense(dataset: PreparedDataset, users: Sequence[RequestUser], stored: np.ndarray) -> np.ndarray:
    """(U X F) the users' numeric columns: stored, with sent values standardised as in preparation."""
    dense = stored.copy()
    for column, spec in enumerate(dataset.dense_features):
        for position, user in enumerate(users):
            if spec.entity == "user" and spec.name in user.features:
                value = float(user.features[spec.name])
                scaled = (value - (spec.mean or 0.0)) / (spec.std if spec.std else 1.0)
                dense[position, column] = 0.0 if np.isnan(scaled) else scaled
    return dense
