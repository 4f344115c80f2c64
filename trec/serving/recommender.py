"""The recommender over a bundle: requests in, ranked raw item IDs out, without HTTP.

    rec = Recommender.load("exports/tt")                          # Bundle.load + warm-up
    rec.recommend(RecommendRequest(user_id="196", k=10, filters={"item_genres": ["Comedy"]}))
    rec.recommend_many([...])                                     # one tower forward, one search, one ranker call
    rec.similar_items("242", k=10)

Routes (cold start, :class:`Settings` sets the thresholds):
- ``known``: the user has a positive training row; the user tower over their stored features and
  history (plus any history and features sent: history appended, features replacing the stored);
- ``cold_features``: an unknown user (or one without a positive training row) who sent at least
  ``min_history`` catalog items of history, or a user feature: the tower over the OOV user_id and
  what was sent (no stored row);
- ``popularity``: nothing to personalise with: items by positive training count.

Stages (reported as ``stage``): ``cold`` (the popularity route), ``warm`` (an unknown user with fewer
than ``hot_history`` catalog items of history), ``hot`` (a known user, or ``hot_history`` items or
more). With ``rerank_hot`` a hot user's list is re-ranked by the bundle's ranker unless the request
says ``rerank: false``. ``recommend_many(requests, online)`` takes each user's online history (raw
item IDs from the online store, oldest first: :mod:`trec.serving.online`), which goes before the
sent history: a click changes the next answer without retraining.

Unknown items in ``history`` are ignored and counted (``unknown_history`` in the response): a
client's catalog can run ahead of the model's, and the rest of the history still describes the
user. ``exclude_seen`` leaves out the user's items of every split (``bundle.seen``) and the items
of the sent history. Filters are exact (:mod:`trec.serving.filters`). Everything runs in the
calling thread; torch runs under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.layout import ITEM_ID, USER_HISTORY, USER_ID
from trec.data.request import RequestUser, Vocabulary, request_batch
from trec.evaluation.candidates import rerank
from trec.evaluation.served import popular_items, popularity_order
from trec.serving.bundle import Bundle
from trec.serving.filters import ItemFilters, RowQuery, SearchStats, search_rows
from trec.serving.requests import (RecommendedItem, RecommendRequest, RecommendResponse, RequestError, Route,
                                   Stage, check_count, check_flag, check_mapping, check_number, check_raw_id,
                                   check_raw_list)

_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class Settings:
    """Limits and cold-start thresholds of a :class:`Recommender`."""

    max_k: int = 1000
    max_candidates: int = 1000
    max_history: int = 1000
    """Items a request's history may list."""
    min_history: int = 1
    """Catalog items of history (online + sent) that make an unknown user ``cold_features`` (warm; a user
    feature does too)."""
    hot_history: int = 5
    """Catalog items of history from which an unknown user is ``hot``."""
    rerank_hot: bool = False
    """Re-rank hot users' lists with the bundle's ranker when the request does not set ``rerank``."""
    max_fetch: int = 2048
    """Most results a filtered row asks of the index before its exact scan (:func:`fetch_size`)."""


@dataclass
class _Plan:
    """One validated request: its route, its tower user and what its list must honour."""

    request: RecommendRequest
    route: Route
    stage: Stage
    user: RequestUser | None
    """None on the popularity route."""
    excluded: np.ndarray
    allowed: np.ndarray | None
    k: int
    candidates: int
    rerank: bool
    unknown_history: int


class Recommender:
    """Recommendations, cold start and filters over a loaded :class:`~trec.serving.bundle.Bundle`."""

    def __init__(self, bundle: Bundle, settings: Settings = Settings()) -> None:
        self.bundle = bundle
        self.settings = settings
        tables = bundle.tables
        self.tables = tables
        self.version = bundle.version
        self.items = Vocabulary(tables, ITEM_ID)
        self.users = Vocabulary(tables, USER_ID)
        self._vocabularies: dict[str, Vocabulary] = {}
        self.filters = ItemFilters(tables)
        self.personalised = bundle.positive_users
        self.item_labels = tables.id_labels(ITEM_ID)
        titles = tables.item_titles()
        self.titles = [title or None for title in titles] if titles else [None] * tables.num_items
        self.popularity = np.asarray(tables.item_counts, np.int64)
        self.popular_order = popularity_order(self.popularity)
        indices, vectors = bundle.index.item_vectors()
        self.in_index = np.zeros(tables.num_items, bool)
        self.in_index[indices] = True
        self.item_vectors = np.zeros((tables.num_items, vectors.shape[1]), np.float32)
        self.item_vectors[indices] = vectors
        self.last_search = SearchStats()

    @classmethod
    def load(cls, path: str | Path, settings: Settings = Settings(), verify: bool = True) -> "Recommender":
        """Load the bundle of the export at ``path`` and answer one request of each kind (warm-up)."""
        recommender = cls(Bundle.load(path, verify=verify), settings)
        recommender.warm_up()
        return recommender

    def warm_up(self) -> None:
        known = np.flatnonzero(self.personalised)
        if len(known):
            user = self.tables.id_labels(USER_ID)[int(known[0])]
            self.recommend(RecommendRequest(user, k=1, rerank=self.bundle.ranker is not None, candidates=2))
        self.similar_items(self.item_labels[int(self.popular_order[0])], 1)

    # ------------------------------------------------------------------------------- requests

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """The top ``k`` of one request (see the module docstring); RequestError for bad input."""
        return self.recommend_many([request])[0]

    @torch.no_grad()
    def recommend_many(self, requests: list[RecommendRequest],
                       online: list[list[str]] | None = None) -> list[RecommendResponse]:
        """:meth:`recommend` for each request, with one user-tower forward, one index search and one
        ranker call for all of them. ``online``: each request's user's online history (raw item IDs,
        oldest first), or None. The first bad request raises its RequestError (``position``: its index)."""
        plans = []
        for position, request in enumerate(requests):
            try:
                plans.append(self._plan(request, online[position] if online is not None else ()))
            except RequestError as error:
                error.position = position
                raise
        tower = [plan for plan in plans if plan.user is not None]
        lists: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}
        if tower:
            for plan, found in zip(tower, self._retrieve(tower)):
                lists[id(plan)] = found
        responses = []
        for plan in plans:
            if plan.user is None:
                items = self._popular(plan)
                found = (items, self.popularity[items].astype(np.float32), "popularity")
            else:
                found = lists[id(plan)]
            responses.append(self._response(plan, *found))
        return responses

    def similar_items(self, item_id: object, k: int = 10) -> list[RecommendedItem]:
        """The ``k`` items whose vectors score highest with ``item_id``'s (the index's stored vectors,
        searched through the index), the item itself left out."""
        raw = check_raw_id(item_id, "item_id")
        item = self.items.known(raw)
        if item is None or not self.in_index[item]:
            raise RequestError("item_id", f"unknown item {raw!r}"[:200])
        k = check_count(k, "k", min(self.settings.max_k, max(int(self.in_index.sum()) - 1, 1)))
        found = self.bundle.index.search(self.item_vectors[item][None], k + 1)
        keep = (found.item_indices[0] >= 0) & (found.item_indices[0] != item)
        items, scores = found.item_indices[0][keep][:k], found.scores[0][keep][:k]
        return self._items(items, scores)

    # ------------------------------------------------------------------------------- planning

    def _plan(self, request: RecommendRequest, online: list[str] = ()) -> _Plan:
        if not isinstance(request, RecommendRequest):
            raise RequestError("request", f"expected a RecommendRequest, got {type(request).__name__}")
        settings, tables = self.settings, self.tables
        raw_user = check_raw_id(request.user_id, "user_id")
        k = check_count(request.k, "k", min(settings.max_k, tables.num_items))
        rerank_wanted = None if request.rerank is None else check_flag(request.rerank, "rerank")
        candidates = check_count(request.candidates, "candidates", min(settings.max_candidates, tables.num_items))
        if rerank_wanted and self.bundle.ranker is None:
            raise RequestError("rerank", "the bundle has no ranker (export with --ranker-run-dir RANKER)")
        exclude_seen = check_flag(request.exclude_seen, "exclude_seen")
        history, unknown = self._history(request.history)
        if len(online):  # the store's items go before the sent ones; an item sent again counts once
            known = [self.items.known(raw) for raw in online]
            stored = np.array([item for item in known if item is not None], np.int64)
            history = np.concatenate([stored[~np.isin(stored, history)], history])
        features = self._user_features(request.user_features)
        context = self._context(request.context)
        allowed = self.filters.allowed(request.filters)
        index = self.users.known(raw_user)
        if index is not None and self.personalised[index]:
            route, stage, user = "known", "hot", RequestUser(index, history, features, context)
        elif len(history) >= max(settings.min_history, 1) or features:
            stage = "hot" if len(history) >= settings.hot_history else "warm"
            route, user = "cold_features", RequestUser(-1, history, features, context)
        else:
            route, stage, user = "popularity", "cold", None
        if rerank_wanted is None:
            rerank_wanted = settings.rerank_hot and stage == "hot" and self.bundle.ranker is not None
        excluded = _EMPTY
        if exclude_seen:
            stored = self.bundle.seen.row(index) if index is not None else _EMPTY
            excluded = np.union1d(stored, history).astype(np.int64)
        return _Plan(request, route, stage, user, excluded, allowed, k, max(candidates, k), rerank_wanted, unknown)

    def _history(self, history: object) -> tuple[np.ndarray, int]:
        """(catalog item indices of the sent history, oldest first; how many were not in the catalog)."""
        if history is None:
            return _EMPTY, 0
        raw = check_raw_list(history, "history", self.settings.max_history)
        found = [self.items.known(value) for value in raw]
        items = np.array([item for item in found if item is not None], np.int64)
        return items, len(found) - len(items)

    def _vocabulary(self, name: str) -> Vocabulary:
        if name not in self._vocabularies:
            self._vocabularies[name] = Vocabulary(self.tables, name)
        return self._vocabularies[name]

    def _user_features(self, sent: object) -> dict[str, np.ndarray | float]:
        features = {}
        allowed = {f.name: f for f in self.tables.features_of("user") if f.name not in (USER_ID, USER_HISTORY)}
        for name, value in check_mapping(sent, "user_features").items():
            where = f"user_features.{name}"
            spec = allowed.get(name)
            if spec is None:
                raise RequestError(where, f"not a user feature (user features: {', '.join(sorted(allowed)) or 'none'})")
            if not spec.is_sparse:
                features[name] = check_number(value, where)
                continue
            values = check_raw_list(value, where, self.settings.max_history) if spec.multi_hot else \
                [check_raw_id(value, where)]
            indices = [self._vocabulary(name).index_or_oov(raw) for raw in values]
            if any(index is None for index in indices):
                raise RequestError(where, "a value outside the feature's vocabulary (it has no out-of-vocabulary row)")
            features[name] = np.array(indices, np.int64)
        return features

    def _context(self, sent: object) -> dict[str, int]:
        context = {}
        names = self.tables.context_names
        for name, value in check_mapping(sent, "context").items():
            where = f"context.{name}"
            if name not in names:
                raise RequestError(where, f"not a context feature of the model (context: {', '.join(names) or 'none'})")
            index = self._vocabulary(name).index_or_oov(check_raw_id(value, where))
            if index is None:
                raise RequestError(where, f"unknown value {value!r} (the feature has no out-of-vocabulary row)"[:200])
            context[name] = index
        return context

    # ------------------------------------------------------------------------------- answering

    def _retrieve(self, plans: list[_Plan]) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """(items, scores, source) of each tower plan: one forward, one search, one ranker call."""
        users = [plan.user for plan in plans]
        count = len(users)
        batch = request_batch(self.tables, users, np.arange(count), np.full(count, -1),
                              self.bundle.retriever_config.data.history_max_len)
        queries = self.bundle.retriever.encode_users(batch).float().numpy()
        rows = [RowQuery(plan.candidates if plan.rerank else plan.k, plan.excluded, plan.allowed) for plan in plans]
        items, scores, self.last_search = search_rows(self.bundle.index, self.item_vectors, self.in_index, queries,
                                                      rows, self.settings.max_fetch)
        found = [(i[: plan.k], s[: plan.k], "two_tower") for plan, i, s in zip(plans, items, scores)]
        reranked = [row for row, plan in enumerate(plans) if plan.rerank]
        if reranked:
            ordered = self._rerank([users[row] for row in reranked], [items[row] for row in reranked],
                                   [scores[row] for row in reranked])
            for row, (i, s) in zip(reranked, ordered):
                found[row] = (i[: plans[row].k], s[: plans[row].k], "two_stage")
        return found

    def _rerank(self, users: list[RequestUser], items: list[np.ndarray],
                scores: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's candidates in the two-stage order (ranker logit + retrieval_weight X retrieval score)."""
        width = max(len(row) for row in items)
        candidates = torch.full((len(items), width), -1, dtype=torch.int64)
        candidate_scores = torch.full((len(items), width), -torch.inf)
        for row, (row_items, row_scores) in enumerate(zip(items, scores)):
            candidates[row, : len(row_items)] = torch.from_numpy(row_items)
            candidate_scores[row, : len(row_items)] = torch.from_numpy(row_scores)
        config = self.bundle.ranker_config
        ranker = self.bundle.ranker

        def score(positions: np.ndarray, flat_items: np.ndarray) -> torch.Tensor:
            # The request users' features (sent ones included), not the dataset's rows: cold users too.
            batch = request_batch(self.tables, users, positions, flat_items, config.data.history_max_len)
            return ranker.model(batch)[0]

        order, ordered_scores = rerank(score, np.arange(len(items)), candidates, candidate_scores,
                                       chunk_rows=len(items) * width, retrieval_weight=config.model.dcn.retrieval_weight)
        return [(order[row, : len(row_items)].numpy(), ordered_scores[row, : len(row_items)].numpy())
                for row, row_items in enumerate(items)]

    def _popular(self, plan: _Plan) -> np.ndarray:
        """The ``k`` most popular items the plan allows, most first."""
        return popular_items(self.popular_order, plan.k, plan.excluded, plan.allowed)

    def _items(self, items: np.ndarray, scores: np.ndarray) -> list[RecommendedItem]:
        return [RecommendedItem(str(self.item_labels[item]), self.titles[item], float(score), rank)
                for rank, (item, score) in enumerate(zip(items.tolist(), scores.tolist()), start=1)]

    def _response(self, plan: _Plan, items: np.ndarray, scores: np.ndarray, source: str) -> RecommendResponse:
        return RecommendResponse(self._items(items, scores), source, self.version, plan.route, plan.unknown_history,
                                 plan.stage)
