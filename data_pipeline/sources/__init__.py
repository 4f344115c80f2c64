"""Raw interaction sources: each turns its files into validated, normalised record batches.

A :class:`Source` yields interactions as record batches with the columns

    user       int64 or string   raw user ID
    item       int64 or string   raw item ID
    timestamp  int64             seconds since the epoch (0 when the source has no time)
    rating     float32           only if ``has_rating``
    label      float32           only if ``has_label``
    <context feature names>      int64 or string raw values (null = missing)

and, once :meth:`Source.interactions` is exhausted, one raw side table per entity (``id`` plus
one column per side feature, named by the feature's final name, and ``title`` for items).
Every source validates its input and raises :class:`trec.errors.TrecError` naming file,
line/row and column.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

CATEGORICAL = "categorical"
NUMERIC = "numeric"


@dataclass(frozen=True)
class RawFeature:
    """A side or context feature as the source provides it (final name, e.g. ``user_age``)."""

    name: str
    entity: str
    """'user', 'item' or 'context'."""
    kind: str = CATEGORICAL
    """'categorical' or 'numeric'."""
    multi_hot: bool = False


class Source(ABC):
    kind: str = ""
    layout: str = ""
    path: str = ""
    has_rating: bool = False
    has_label: bool = False
    has_time: bool = True
    rating_max: float | None = None
    """Top of the rating scale when the source defines one (MovieLens: 5)."""

    def __init__(self) -> None:
        self.features: list[RawFeature] = []

    @abstractmethod
    def interactions(self) -> Iterator[pa.RecordBatch]:
        """Validated interaction batches in source order (see the module docstring)."""

    def side_table(self, entity: str) -> pa.Table | None:
        """Raw side information of 'user' or 'item' (``id`` + feature columns), or None."""
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "layout": self.layout, "path": self.path}


def build_source(kind: str, source_path: str | None, options) -> Source:
    """The source named on the command line (``movielens``, ``parquet``, ``csv``, ``synthetic``)."""
    from trec.errors import TrecError

    if kind == "synthetic":
        from data_pipeline.sources.synthetic import SyntheticSource

        return SyntheticSource(options.synthetic, options.seed, options.rows_per_shard)
    if not source_path:
        raise TrecError(f"'{kind}' needs --source PATH")
    if kind == "movielens":
        from data_pipeline.sources.movielens import MovieLensSource

        return MovieLensSource(source_path)
    if kind in ("parquet", "csv"):
        from data_pipeline.sources.tabular import TabularSource

        return TabularSource(kind, source_path, options.columns)
    raise TrecError(f"unknown source '{kind}' (choose movielens, parquet, csv or synthetic)")
