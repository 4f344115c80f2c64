"""The evaluation protocol's splits: what is validated on, and which items are never recommended."""

from __future__ import annotations

from typing import Sequence

from trec.data import PreparedDataset
from trec.errors import TrecError


def evaluation_splits(dataset: PreparedDataset) -> tuple[str | None, list[str]]:
    """(validation split or None, splits excluded from the final test ranking)."""
    validation = "val" if dataset.has_split("val") else None
    return validation, ["train"] + (["val"] if validation else [])


def excluded_splits(dataset: PreparedDataset, split: str) -> list[str]:
    """Splits whose items are left out when ranking for ``split``: everything before test, or train."""
    return evaluation_splits(dataset)[1] if split == "test" else ["train"]


def check_cutoffs(ks: Sequence[int], dataset: PreparedDataset) -> None:
    """Refuse (one line) a top-K cut-off beyond the catalog: its metrics would silently be of fewer items."""
    too_large = [k for k in ks if k > dataset.num_items]
    if too_large:
        raise TrecError(f"evaluation.ks: k={max(too_large)} exceeds the catalog of {dataset.num_items} items of "
                        f"{dataset.path}; use cut-offs of at most {dataset.num_items}")
