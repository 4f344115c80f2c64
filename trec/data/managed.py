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
