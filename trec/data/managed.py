"""Managed-collision IDs on the data side: what the model sees for a ``managed`` user_id / item_id.

A dataset prepared with ``--id-mapping managed`` keeps catalog indices (0..N-1) in its shards:
splits, evaluation exclusions, negatives and the export key users and items by them. The model
never sees them: batches carry each ID's ``managed_id`` (the raw ID's stable hash into
[0, 2**40), written by the prepare beside the index in the mapping file), and the model's
managed-collision remapper (:mod:`trec.models.managed`) turns those into table rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from trec.data.batch import FeatureSpec
from trec.data.checks import parquet_errors
from trec.errors import TrecError

MANAGED = "managed"


def is_managed(spec: FeatureSpec) -> bool:
    return spec.mapping == MANAGED


def read_managed_ids(root: Path, spec: FeatureSpec) -> np.ndarray:
    """(N,) int64 managed ID of each catalog index of ``spec`` (user_id or item_id), from its mapping file."""
    path = root / str(spec.mapping_file)
    with parquet_errors(path):
        table = pq.read_table(path, columns=["index", "managed_id"])
    index = table["index"].to_numpy()
    if len(index) != spec.cardinality or (len(index) and (index.min() < 0 or index.max() >= len(index))):
        raise TrecError(f"{path}: expected indices 0..{spec.cardinality - 1} once each (the file does not match "
                        "the manifest); prepare the dataset again")
    ids = np.empty(len(index), np.int64)
    ids[index] = table["managed_id"].to_numpy()
    return ids


class CatalogIndex(nn.Module):
    """Managed IDs → catalog indices, for what is keyed by user or item (popularity for logQ, EASE's rows).

    Shapes: forward((C,) managed IDs) → (C,) int64 catalog indices. Buffers derived from the
    dataset, not saved in checkpoints.
    """

    def __init__(self, managed_ids: np.ndarray) -> None:
        super().__init__()
        order = np.argsort(managed_ids, kind="stable")
        self.register_buffer("sorted_ids", torch.from_numpy(managed_ids[order].astype(np.int64)), persistent=False)
        self.register_buffer("catalog", torch.from_numpy(order.astype(np.int64)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        found = torch.searchsorted(self.sorted_ids, ids).clamp(max=self.sorted_ids.numel() - 1)
        return self.catalog[found]


def catalog_index(dataset, name: str) -> CatalogIndex | None:
    """The :class:`CatalogIndex` of the dataset's managed ``name`` (user_id or item_id), else None (its KJTs
    carry catalog indices)."""
    spec = dataset.feature(name)
    if not is_managed(spec):
        return None
    return CatalogIndex(dataset.model_ids(spec, np.arange(spec.cardinality, dtype=np.int64)))
