"""What a recommender is asked and what it answers: request and response dataclasses, and the
checks that turn bad input into a :class:`RequestError` naming the field (HTTP 422 next)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from trec.errors import TrecError

Route = Literal["known", "cold_features", "popularity"]
Source = Literal["two_tower", "two_stage", "popularity"]
Stage = Literal["cold", "warm", "hot"]


class RequestError(TrecError):
    """A request the recommender refuses: ``field`` names the bad field (``k``, ``filters.item_genres``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.position: int | None = None
        """In :meth:`~trec.serving.Recommender.recommend_many`: the index of the bad request."""


@dataclass
class RecommendRequest:
    """One user's request (see :meth:`trec.serving.Recommender.recommend`)."""

    user_id: str
    k: int = 10
    exclude_seen: bool = True
    """Leave out the user's items of every split of the dataset (as ``trec search`` does)."""
    history: list[str] | None = None
    """Raw item IDs the user just interacted with (oldest first); IDs outside the catalog are ignored
    and counted in :attr:`RecommendResponse.unknown_history`."""
    user_features: dict[str, str | list[str] | float] | None = None
    """User side features by name (a categorical value, a list for a multi-hot one, a number)."""
    context: dict[str, str] | None = None
    """Context features the model trained with; an absent one stays empty, as in evaluation."""
    filters: dict[str, list[str]] | None = None
    """Item categorical / multi-hot feature → allowed raw values (any of them); features are ANDed."""
    rerank: bool | None = None
    """Re-rank ``candidates`` retrieved items with the bundle's ranker (DCN); None: only hot users, and only when
    the recommender's ``rerank_hot`` is set."""
    candidates: int = 100


@dataclass
class RecommendedItem:
    item_id: str
    title: str | None
    score: float
    """The two-tower inner product, the two-stage score (ranker logit plus the weighted retrieval
    score), or the item's positive training count (popularity)."""
    rank: int
    """1-based."""


@dataclass
class RecommendResponse:
    items: list[RecommendedItem]
    source: Source
    model_version: str
    route: Route
    unknown_history: int = 0
    """Items of ``history`` not in the catalog (ignored)."""
    stage: Stage = "cold"
    """cold (popularity), warm (a few items of history), hot (a known user or a long enough history)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(value: object, field: str, limit: int) -> int:
    """A positive int of at most ``limit``."""
    if not _is_int(value):
        raise RequestError(field, f"expected an integer, got {type(value).__name__}")
    if value < 1:
        raise RequestError(field, f"expected a positive number, got {value}")
    if value > limit:
        raise RequestError(field, f"{value} exceeds the limit of {limit}")
    return int(value)


def check_raw_id(value: object, field: str) -> str:
    """A raw ID as a string (an int is accepted: JSON has no way to say which a source used)."""
    if _is_int(value):
        return str(value)
    if not isinstance(value, str) or not value:
        raise RequestError(field, f"expected a non-empty string, got {value!r}"[:200])
    return value


def check_raw_list(value: object, field: str, limit: int) -> list[str]:
    """A list of at most ``limit`` raw IDs."""
    if not isinstance(value, (list, tuple)):
        raise RequestError(field, f"expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(field, f"{len(value)} values exceed the limit of {limit}")
    return [check_raw_id(item, f"{field}[{position}]") for position, item in enumerate(value)]


def check_mapping(value: object, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(field, f"expected an object, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise RequestError(field, f"keys must be feature names (strings), got {key!r}"[:200])
    return value


def check_number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(field, f"expected a finite number, got {value!r}"[:200])
    return float(value)


def check_flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(field, f"expected true or false, got {value!r}"[:200])
    return value
