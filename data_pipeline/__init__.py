"""Offline preparation jobs: raw interaction logs → a validated, ID-mapped, split Parquet dataset.

``trec data prepare SOURCE --out DIR`` runs :func:`data_pipeline.prepare.prepare_dataset` over
one of the sources in :mod:`data_pipeline.sources` (MovieLens layouts, generic Parquet/CSV logs,
a synthetic generator). The on-disk format is defined in :mod:`data_pipeline.layout` and read
back for training by :mod:`trec.data`. Nothing here imports torch.
"""
