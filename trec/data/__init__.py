"""Prepared dataset → :class:`RecBatch` (a torchrec ``Batch`` with a ``KeyedJaggedTensor``) per rank.

The dataset directory is written by ``trec data prepare`` (format: :mod:`data_pipeline.layout`,
README "Data"). Typical use in a training loop::

    dataset = PreparedDataset.open(cfg.data.path)
    reader = InteractionReader(dataset, "train", cfg.data.batch_size, rank, world_size, seed=seed)
    reader.load_state_dict(checkpoint["reader"])          # optional: resume mid-epoch
    for epoch in range(start_epoch, epochs):
        reader.set_epoch(epoch)                           # keeps the position if it is that epoch
        for batch in reader:                              # RecBatch, prefetched by a thread
            ...
            checkpoint["reader"] = reader.state_dict()    # {"epoch": e, "batch": k}

A batch has B labelled (user, item) rows followed by N item-only rows (extra candidates, added
by an ``augment`` hook). Features are joined from in-memory user/item tables by
:meth:`PreparedDataset.build_batch`, which is fully vectorised (numpy, no per-row Python).

Modules: :mod:`~trec.data.batch` (RecBatch, FeatureSpec, the Augment hook), :mod:`~trec.data.dataset`
(PreparedDataset), :mod:`~trec.data.csr` (Csr and the (row, column) keys), :mod:`~trec.data.reader`
(InteractionReader, iter_index_batches), :mod:`~trec.data.checks` (file validation).
"""

from trec.data.batch import Augment, FeatureSpec, RecBatch
from trec.data.checks import check_finite, check_indices, parquet_errors, read_manifest, verify_files
from trec.data.csr import Csr, gather_ranges, key_rows, pair_key
from trec.data.dataset import PreparedDataset
from trec.data.reader import InteractionReader, iter_index_batches

__all__ = [
    "Augment", "Csr", "FeatureSpec", "InteractionReader", "PreparedDataset", "RecBatch", "check_finite",
    "check_indices", "gather_ranges", "iter_index_batches", "key_rows", "pair_key", "parquet_errors",
    "read_manifest", "verify_files",
]
