"""trec.serving.Recommender over a real bundle (a tiny synthetic dataset, a short two-tower run and a
short DCN run, exported with a flat index): the same lists as `trec search`, exact filters, each
cold-start route, batched requests equal to single ones, re-ranking, and bad requests refused by field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training import run_command, trec_command

from trec.serving.filters import RowQuery, fetch_size
from trec.serving.recommender import Recommender, Settings
from trec.serving.requests import RecommendRequest, RequestError


@pytest.fixture(scope="module")
def export(serving_export):
    return serving_export  # tests/conftest.py: one bundle for the serving tests


@pytest.fixture(scope="module")
def rec(export) -> Recommender:
    return Recommender.load(export["export"])


def users_of(rec: Recommender) -> list[str]:
    return [str(raw) for raw in rec.tables.id_labels("user_id")[: rec.tables.num_users]]


def ids(response) -> list[str]:
    return [item.item_id for item in response.items]


def search_output(export, user: str, k: int) -> list[str]:
    """The raw item IDs `trec search` prints for ``user``, in its order."""
    out = run_command(trec_command(1, "search", "--index", export["export"], "--run-dir", export["tt"],
                                   "--user", user, "-k", str(k))).stdout
    lines = [line.split() for line in out.splitlines()]
    ranked = [words[1] for words in lines if words and words[0].rstrip(".").isdigit()]
    assert len(ranked) == k, out
    return ranked


def test_known_users_get_the_lists_of_trec_search(rec, export):
    users = users_of(rec)
    for user in (users[0], users[57]):
        response = rec.recommend(RecommendRequest(user, k=10))
        assert (response.route, response.source, response.model_version) == ("known", "two_tower", rec.version)
        assert ids(response) == search_output(export, user, 10)
        assert [item.rank for item in response.items] == list(range(1, 11))
    unknown = rec.recommend(RecommendRequest("no-such-user", k=7))
    assert (unknown.route, unknown.source) == ("popularity", "popularity")
    assert ids(unknown) == search_output(export, "no-such-user", 7)  # its popularity fallback


def test_request_batches_of_known_users_equal_the_bundles_user_vectors(rec):
    from trec.data.request import RequestUser, request_batch

    known = np.flatnonzero(rec.personalised)
    users = [RequestUser(int(index)) for index in known]
    batch = request_batch(rec.tables, users, np.arange(len(users)), np.full(len(users), -1),
                          rec.bundle.retriever_config.data.history_max_len)
    with torch.no_grad():
        vectors = rec.bundle.retriever.encode_users(batch).numpy()
    assert np.array_equal(vectors, rec.bundle.user_vectors(known))


def test_cold_users_are_the_oov_id_and_what_they_sent(rec):
    from trec.data.request import RequestUser, request_batch

    tables = rec.tables
    history, category = np.array([5, 9, 2]), tables.feature("user_cat_0")
    users = [RequestUser(-1, history=history, features={"user_cat_0": np.array([3])}),
             RequestUser(0, history=np.array([7]))]
    batch = request_batch(tables, users, np.array([0, 1, -1]), np.array([-1, 4, 8]), None)
    keys = batch.sparse_features.to_dict()
    assert keys["user_id"].to_dense()[0].tolist() == [tables.feature("user_id").oov_index]
    assert keys["user_history"].to_dense()[0].tolist() == history.tolist()
    assert keys["user_cat_0"].to_dense()[0].tolist() == [3] and category.cardinality > 3
    stored = tables.build_batch(np.array([0]), np.array([4]), np.zeros(1)).sparse_features.to_dict()
    max_len = tables.feature("user_history").max_len
    assert keys["user_history"].to_dense()[1].tolist() == (stored["user_history"].to_dense()[0].tolist() + [7])[-max_len:]
    assert keys["item_id"].to_dense()[1].tolist() == [4] and keys["user_id"].to_dense()[2].tolist() == []


def test_each_cold_start_route(rec):
    users, items = users_of(rec), rec.item_labels
    history = [items[3], items[40], "not-an-item"]
    cold = rec.recommend(RecommendRequest("new-user", k=10, history=history))
    assert (cold.route, cold.source, cold.unknown_history) == ("cold_features", "two_tower", 1)
    assert not {items[3], items[40]} & set(ids(cold))  # the sent history counts as seen
    assert len(ids(cold)) == 10
    featured = rec.recommend(RecommendRequest("new-user", k=5, user_features={"user_cat_0": "never-seen"}))
    assert featured.route == "cold_features" and len(featured.items) == 5
    popular = rec.recommend(RecommendRequest("new-user", k=5, history=["not-an-item"]))
    assert (popular.route, popular.unknown_history) == ("popularity", 1)
    counts = [item.score for item in popular.items]
    assert counts == sorted(counts, reverse=True) and counts[0] == rec.popularity.max()
    strict = Recommender(rec.bundle, Settings(min_history=3))
    assert strict.recommend(RecommendRequest("new-user", k=5, history=history)).route == "popularity"
    assert rec.recommend(RecommendRequest(users[1], k=5)).route == "known"
    value = str(rec.tables.id_labels("item_cat_1")[0])
    filtered = rec.recommend(RecommendRequest("new-user", k=50, filters={"item_cat_1": [value]}))
    allowed = rec.filters.allowed({"item_cat_1": [value]})
    assert filtered.route == "popularity" and len(filtered.items) == min(50, int(allowed.sum()))
    assert all(allowed[rec.items.known(item)] for item in ids(filtered))


def random_filters(rec: Recommender, rng: np.random.Generator) -> dict[str, list[str]]:
    filters = {}
    for name in rng.choice(["item_cat_1", "item_tags_2"], size=rng.integers(1, 3), replace=False):
        labels = [label for label in rec.tables.id_labels(name) if label]
        filters[str(name)] = [str(v) for v in rng.choice(labels, size=rng.integers(1, 4), replace=False)]
    return filters


def test_filters_are_exact_and_complete(rec):
    """Every returned item passes; a list is the exact top of the eligible items (allowed, unseen)."""
    rng = np.random.default_rng(0)
    users = users_of(rec)
    requests = [RecommendRequest(user, k=int(rng.integers(1, 30)), filters=random_filters(rec, rng),
                                 exclude_seen=bool(rng.integers(0, 2))) for user in users[:120]]
    requests += [RecommendRequest(f"new-{n}", k=8, history=[rec.item_labels[n]], filters=random_filters(rec, rng))
                 for n in range(20)]
    responses = rec.recommend_many(requests)
    queries = {}
    for request, response in zip(requests, responses):
        allowed = rec.filters.allowed(request.filters)
        plan = rec._plan(request)
        eligible = allowed & rec.in_index
        eligible[plan.excluded] = False
        got = [rec.items.known(item) for item in ids(response)]
        assert all(allowed[item] for item in got), request
        assert len(got) == min(request.k, int(eligible.sum())), request
        if plan.user is not None:
            queries[id(request)] = (plan, eligible, got)
    assert queries
    users = [plan.user for plan, _, _ in queries.values()]
    from trec.data.request import request_batch

    batch = request_batch(rec.tables, users, np.arange(len(users)), np.full(len(users), -1),
                          rec.bundle.retriever_config.data.history_max_len)
    with torch.no_grad():
        vectors = rec.bundle.retriever.encode_users(batch).numpy()
    for vector, (plan, eligible, got) in zip(vectors, queries.values()):
        scores = rec.item_vectors @ vector
        best = sorted(np.flatnonzero(eligible), key=lambda item: -scores[item])[: plan.k]
        assert np.allclose(scores[got], scores[best], atol=1e-5)  # the same scores (ties may swap)


def test_fetch_size_is_bounded():
    allowed = np.zeros(1000, bool)
    allowed[:10] = True
    assert fetch_size(RowQuery(10, np.arange(5)), 1000, 50) == 15
    assert fetch_size(RowQuery(10, np.arange(5), allowed), 1000, 50) == 50  # capped: the exact scan follows
    assert fetch_size(RowQuery(10, np.arange(5), np.ones(1000, bool)), 1000, 50) == 15
    assert fetch_size(RowQuery(990, np.arange(20)), 1000, 50) == 1000


def test_recommend_many_equals_recommend_one_by_one(rec):
    users, items = users_of(rec), rec.item_labels
    value = str(rec.tables.id_labels("item_tags_2")[1])
    requests = [RecommendRequest(users[2], k=5), RecommendRequest("stranger", k=4),
                RecommendRequest(users[9], k=6, rerank=True, candidates=20),
                RecommendRequest("cold", k=5, history=[items[1], items[2]], rerank=True, candidates=15),
                RecommendRequest(users[9], k=6, filters={"item_tags_2": [value]}, exclude_seen=False),
                RecommendRequest(users[30], k=3, history=[items[7]])]
    together = rec.recommend_many(requests)
    for request, batched in zip(requests, together):
        alone = rec.recommend(request)
        assert (ids(alone), alone.route, alone.source) == (ids(batched), batched.route, batched.source)
        assert np.allclose([i.score for i in alone.items], [i.score for i in batched.items], atol=1e-4)
    assert [r.source for r in together] == ["two_tower", "popularity", "two_stage", "two_stage", "two_tower",
                                            "two_tower"]


def test_rerank_orders_candidates_by_the_ranker(rec):
    user = users_of(rec)[4]
    retrieved = rec.recommend(RecommendRequest(user, k=20))
    reranked = rec.recommend(RecommendRequest(user, k=20, rerank=True, candidates=20))
    assert reranked.source == "two_stage" and set(ids(reranked)) == set(ids(retrieved))
    index = rec.users.known(user)
    candidates = np.array([rec.items.known(item) for item in ids(retrieved)])
    weight = rec.bundle.ranker_config.model.dcn.retrieval_weight
    expected = rec.bundle.rank_scores(np.full(20, index), candidates) + weight * np.array(
        [item.score for item in retrieved.items])
    assert np.allclose([item.score for item in reranked.items], np.sort(expected)[::-1], atol=1e-4)


def test_similar_items_leave_the_item_out(rec):
    item = rec.item_labels[10]
    similar = rec.similar_items(item, 5)
    assert len(similar) == 5 and item not in [s.item_id for s in similar]
    vectors = rec.item_vectors
    scores = vectors @ vectors[10]
    scores[10] = -np.inf
    assert np.allclose([s.score for s in similar], np.sort(scores)[::-1][:5], atol=1e-5)


@pytest.mark.parametrize("change, field", [
    ({"k": 0}, "k"), ({"k": 121}, "k"), ({"k": "10"}, "k"), ({"k": True}, "k"),
    ({"user_id": None}, "user_id"), ({"user_id": ""}, "user_id"),
    ({"candidates": -1}, "candidates"), ({"exclude_seen": "yes"}, "exclude_seen"), ({"rerank": 1}, "rerank"),
    ({"history": "42"}, "history"), ({"history": [1.5]}, "history[0]"),
    ({"filters": {"item_color": ["red"]}}, "filters.item_color"), ({"filters": ["item_cat_1"]}, "filters"),
    ({"filters": {"item_cat_1": ["no-such-value"]}}, "filters.item_cat_1[0]"),
    ({"filters": {"item_cat_1": []}}, "filters.item_cat_1"), ({"filters": {"item_cat_1": "1"}}, "filters.item_cat_1"),
    ({"user_features": {"user_age": 3}}, "user_features.user_age"),
    ({"user_features": {"user_id": "1"}}, "user_features.user_id"),
    ({"user_features": {"user_cat_0": ["a", "b"]}}, "user_features.user_cat_0"),
    ({"context": {"device": "phone"}}, "context.device"), ({"context": "phone"}, "context"),
])
def test_bad_requests_name_their_field(rec, change, field):
    request = RecommendRequest(**{"user_id": users_of(rec)[0], "k": 5, **change})
    with pytest.raises(RequestError) as error:
        rec.recommend(request)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")
    with pytest.raises(RequestError) as error:  # in a batch: the same error, with its position
        rec.recommend_many([RecommendRequest(users_of(rec)[0]), request])
    assert error.value.field == field and error.value.position == 1


def test_bad_similar_items_requests(rec):
    for item, k, field in (("no-such-item", 5, "item_id"), (None, 5, "item_id"), (rec.item_labels[0], 0, "k"),
                           (rec.item_labels[0], 120, "k")):
        with pytest.raises(RequestError) as error:
            rec.similar_items(item, k)
        assert error.value.field == field
