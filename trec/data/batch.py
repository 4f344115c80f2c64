"""The batch schema: :class:`RecBatch` (a torchrec ``Batch``), :class:`FeatureSpec` (one manifest
feature) and :data:`Augment` (the reader hook that appends rows to a batch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline import layout as L
from trec.errors import TrecError
from trec.io import JsonField, check_json_fields, quote

Augment = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator],
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
]


# --------------------------------------------------------------------------------------------
# batch and feature specs
# --------------------------------------------------------------------------------------------


@dataclass
class RecBatch(Batch):
    """B labelled (user, item) rows, followed by N item-only rows (extra candidate items).

    dense_features: (B+N) X F float32 — standardised numeric features, in manifest order
        (zeros where the row has no such entity; F may be 0).
    sparse_features: KeyedJaggedTensor, stride B+N, keys = every categorical feature in
        manifest order (user_* incl. user_id and user_history, item_* incl. item_id, context
        features); a row with user index -1 has empty user keys, a row with item index -1 has
        empty item keys. values int64, lengths int32.
    labels: (B,) float32, the dataset's labels (1.0 where the source has none; a row is a
        positive when its label is >= data.positive_threshold). The ranker's sampler rewrites
        them to click targets (1 positive, 0 negative, -1 a padding row the loss ignores).
    ratings: (B,) float32 (0 where the source has no rating).
    """

    ratings: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "RecBatch":
        return RecBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            ratings=self.ratings.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.ratings.record_stream(stream)

    def pin_memory(self) -> "RecBatch":
        return RecBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            ratings=self.ratings.pin_memory(),
        )

    @property
    def num_labelled(self) -> int:
        return int(self.labels.shape[0])

    def nbytes(self) -> int:
        """Bytes of the batch's tensors (for throughput in MB/s)."""
        kjt = self.sparse_features
        tensors = [self.dense_features, self.labels, self.ratings, kjt.values(), kjt.lengths()]
        return int(sum(t.numel() * t.element_size() for t in tensors))



def keyed_jagged(names: list[str], lengths: list[np.ndarray], values: list[np.ndarray],
                 stride: int) -> KeyedJaggedTensor:
    """One KJT of stride R from each key's (lengths (R,), values) numpy arrays, keys in ``names`` order
    (lengths become int32, values int64, as FBGEMM's kernels take them).

    Values per key are known here, so the KJT carries them (``length_per_key``, ``offset_per_key``):
    torchrec's input dist would otherwise sum the lengths per key again at every split and permute.
    """
    counts = [len(v) for v in values]
    return KeyedJaggedTensor(
        keys=list(names),
        length_per_key=counts,
        offset_per_key=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist(),
        values=torch.from_numpy(np.concatenate([v.astype(np.int64, copy=False) for v in values])
                                if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate([n.astype(np.int32, copy=False) for n in lengths])
                                 if lengths else np.zeros(0, np.int32)),
        stride=stride,
    )

@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the manifest (``features`` list); also the KJT key / dense column name."""

    name: str
    entity: str
    """'user', 'item' or 'context'."""
    kind: str
    """'categorical' (a KJT key) or 'numeric' (a dense column)."""
    multi_hot: bool = False
    cardinality: int | None = None
    """Embedding-table rows (vocab size + 1 for OOV, or hash buckets); managed: the catalog size."""
    zch_size: int | None = None
    """managed: rows of the model's table (the managed-collision remapper's output range)."""
    oov_index: int | None = None
    mapping: str | None = None
    """'vocab', 'hash' or 'managed'."""
    mapping_file: str | None = None
    mean: float | None = None
    std: float | None = None
    vocab_of: str | None = None
    """user_history: its indices are those of this feature (item_id)."""
    max_len: int | None = None

    @property
    def is_sparse(self) -> bool:
        return self.kind == "categorical"

    def standardise(self, column: pa.ChunkedArray) -> np.ndarray:
        """A numeric column as (x - mean) / std float32; missing values (NaN) become the mean, i.e. 0."""
        values = column.to_numpy().astype(np.float32)
        std = self.std if self.std else 1.0
        values = (values - np.float32(self.mean or 0.0)) / np.float32(std)
        return np.nan_to_num(values, nan=0.0).astype(np.float32)

    @classmethod
    def from_manifest(cls, entry: dict, where: str) -> "FeatureSpec":
        if not isinstance(entry, dict):
            raise TrecError(f"{where}: a feature must be an object, got {quote(entry)}")
        check_json_fields(entry, {"name": _FEATURE_FIELDS["name"]}, f"{where}: a feature")
        check_json_fields(entry, _FEATURE_FIELDS, f"{where}: feature '{entry['name']}'")
        if entry["entity"] not in L.ENTITIES or entry["kind"] not in ("categorical", "numeric"):
            raise TrecError(f"{where}: feature '{entry['name']}': bad entity/kind "
                            f"{quote(entry['entity'])}/{quote(entry['kind'])}")
        if entry["kind"] == "categorical" and entry.get("cardinality") is None:
            raise TrecError(f"{where}: categorical feature '{entry['name']}' has no cardinality")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in entry.items() if k in known})


# The JSON type of every field of a manifest's feature entry (data_pipeline writes them); a new
# field is one more line here. Other keys ("fill", "missing", "file") are not read.
_FEATURE_FIELDS = {
    "name": JsonField(str),
    "entity": JsonField(str),
    "kind": JsonField(str),
    "multi_hot": JsonField(bool, required=False),
    "cardinality": JsonField(int, minimum=1, nullable=True, required=False),
    "zch_size": JsonField(int, minimum=2, nullable=True, required=False),
    "oov_index": JsonField(int, minimum=0, nullable=True, required=False),
    "mapping": JsonField(str, nullable=True, required=False),
    "mapping_file": JsonField(str, nullable=True, required=False),
    "mean": JsonField(float, nullable=True, required=False),
    "std": JsonField(float, minimum=0, nullable=True, required=False),
    "vocab_of": JsonField(str, nullable=True, required=False),
    "max_len": JsonField(int, minimum=0, nullable=True, required=False),
}
